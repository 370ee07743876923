"""Remote use of ``m3d serve`` (serving/trust.py): a non-loopback bind needs a token as strong as a generated one;
the client and the panel warn when a remote server is reached over plain http. Nothing here binds or connects to a
non-loopback address: the refusals come before binding, the warnings before any connection."""

from __future__ import annotations

import secrets
import subprocess
import sys
import warnings

import pytest

from M3DAssistantLib.errors import InputError
from M3DAssistantLib.serving.client import InsecureTransportWarning, M3DClient
from M3DAssistantLib.serving.server import _check_token, serve
from M3DAssistantLib.serving.trust import plain_http_warning, token_strength_bits
from M3DAssistantLib.settings import MemorySettings

WEAK = {"16 times a": "a" * 16, "64 times a": "a" * 64, "a repeated pair": "ab" * 20,
        "a repeated run": "0123456789abcdef" * 2, "20 random characters": secrets.token_urlsafe(15)[:20],
        "a word": "correcthorsebatterystaple"}


@pytest.mark.parametrize("name", sorted(WEAK))
def test_weak_tokens_are_refused_for_a_remote_bind(name):
    """case: --allow-remote with a weak token ('aaaaaaaaaaaaaaaa', a repeated pattern, under 32 characters) ->
    refuses to start, naming its strength and how to generate one"""
    with pytest.raises(InputError, match=r"as strong as a generated one: at least 32 random characters, about 128 "
                                         r"bits \(this one: .*\); generate one with python -c"):
        serve(host="192.0.2.1", allow_remote=True, token=WEAK[name])  # refused before binding


def test_generated_tokens_are_accepted_and_loopback_keeps_any_token():
    for _ in range(200):
        for token in (secrets.token_urlsafe(32), secrets.token_urlsafe(24), secrets.token_hex(16)):
            assert _check_token("0.0.0.0", token, True) == (token, False), token
    assert token_strength_bits(secrets.token_urlsafe(32)) > 200
    assert _check_token("127.0.0.1", "a" * 16, False) == ("a" * 16, False)  # this machine only: the user's choice


def test_the_cli_refuses_a_weak_token_file(tmp_path):
    token_file = tmp_path / "token.txt"
    token_file.write_text("aaaaaaaaaaaaaaaa\n")
    result = subprocess.run([sys.executable, "-m", "M3DAssistantLib.serving", "--host", "0.0.0.0", "--allow-remote",
                             "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "as strong as a generated one" in result.stderr and "secrets.token_urlsafe(32)" in result.stderr


@pytest.mark.parametrize("url,warned", [
    ("http://gpu-box:8765", True), ("http://10.1.2.3:8765", True), ("gpu-box:8765", True),
    ("https://gpu-box:8765", False), ("http://127.0.0.1:8765", False), ("http://localhost:8765", False),
    ("http://[::1]:8765", False)])
def test_the_client_warns_about_plain_http_to_another_machine(url, warned):
    """case: a remote server URL with plain http:// (client, panel) -> InsecureTransportWarning saying the token and
    the images travel unencrypted, with https / SSH tunnel as the fix; the panel's status says so"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = M3DClient(url, "token")  # no connection yet
    found = [w for w in caught if issubclass(w.category, InsecureTransportWarning)]
    assert bool(found) == warned and bool(client.transport_warning) == warned
    if warned:
        message = str(found[0].message)
        assert "unencrypted" in message and "https" in message and "ssh -L" in message
        assert plain_http_warning(url) == message


def test_the_panel_status_warns_about_plain_http(assistant):  # noqa: F811 (fixture)
    logic = assistant.M3DAssistantLogic(settings=MemorySettings())
    p = logic.getParameterNode()
    p.runOn = assistant.RUN_REMOTE
    logic.serverToken = "in-memory-token"
    for url, warned in (("http://gpu-box:8765", True), ("https://gpu-box:8765", False),
                        ("http://127.0.0.1:8765", False)):
        p.serverUrl = url
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureTransportWarning)
            logic.session()
        status = logic.workerStatus()
        assert status.startswith(f"Remote server: {url}")
        assert ("WARNING: plain http to another machine, not encrypted" in status) == warned, status
    logic.shutdown()
