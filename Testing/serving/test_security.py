"""Security: nothing leaves the machine unless the user configured a remote server, and no request reaches the file
system.

The product runs in subprocesses under ``Testing/helpers/audited.py``, a CPython audit hook that records every DNS
lookup or connection to a host other than this machine, every file opened for writing and every file-system change. The
hook sees every library's sockets and files, so a dependency that phoned home (telemetry, an update check, a hub lookup
for a local folder) would show up here. The hub's offline switches are removed from the environment, so nothing is
held back by them. A control test proves the hook records what it should.
"""

from __future__ import annotations

import ast
import getpass
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from repo_paths import HELPERS, REPO
from serving import start_server_process, stop_server_process

from M3DAssistantLib.geometry import RasRoi
from M3DAssistantLib.results import SamplingOptions
from M3DAssistantLib.serving.client import M3DClient, volume_id

AUDITED = str(HELPERS / "audited.py")
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                    "DO_NOT_TRACK")
SHORT = SamplingOptions(max_new_tokens=4)


def _env(tmp_path: Path) -> dict:
    """The user's environment without offline switches, with the hub cache and the temp folder in known places."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_SWITCHES}
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "tmp").mkdir()
    env.update(HF_HOME=str(tmp_path / "hf-home"), TMPDIR=str(tmp_path / "tmp"), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([str(HELPERS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _audited(log: Path, module: str, *args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, AUDITED, str(log), module, *args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _inside(path: str, *roots: Path) -> bool:
    resolved = Path(path).resolve()
    return any(resolved == r.resolve() or r.resolve() in resolved.parents for r in roots)


def _written_paths(events: list[dict]) -> list[str]:
    return [path for e in events if e["kind"] == "write" for path in e["paths"]]


def test_the_audit_records_lookups_connections_and_writes(tmp_path):
    """Control: a lookup and a connection to a remote host, and a file write, are all recorded (and loopback is
    not)."""
    (tmp_path / "phone_home.py").write_text(
        "import socket, urllib.request\n"
        "socket.getaddrinfo('localhost', 80)\n"
        "try:\n    socket.getaddrinfo('huggingface.co', 443)\nexcept OSError:\n    pass\n"
        "s = socket.socket()\ns.settimeout(0.2)\n"
        "try:\n    s.connect(('192.0.2.1', 443))\nexcept OSError:\n    pass\n"
        f"open({str(tmp_path / 'written.txt')!r}, 'w').close()\n"
    )
    env = _env(tmp_path)
    env["PYTHONPATH"] = str(tmp_path)
    log = tmp_path / "audit.jsonl"
    _audited(log, "phone_home", env=env)
    network = [e for e in _events(log) if e["kind"] == "network"]
    assert [e["event"] for e in network] == ["socket.getaddrinfo", "socket.connect"], network
    assert "huggingface.co" in network[0]["host"] and "192.0.2.1" in network[1]["host"]
    assert str(tmp_path / "written.txt") in _written_paths(_events(log))


@pytest.mark.slow
def test_shell_demo_retrieve_and_training_send_nothing_off_the_machine(tiny_phi3, tiny_clip, data_dir, tmp_path):
    """The demo (load, report, segment, locate, files), retrieval and a short LoRA training run: no DNS lookup or
    connection beyond this machine, nothing written to the hub cache, writes only where the user said (and the
    temp folder)."""
    env = _env(tmp_path)
    log = tmp_path / "audit.jsonl"
    out = tmp_path / "demo"
    _audited(log, "M3DAssistantLib.cli", "demo", "--model", str(tiny_phi3), "--device", "cpu", "--output-dir",
             str(out), "--max-new-tokens", "8", "--quiet", env=env)
    assert (out / "report.txt").exists() and (out / "results.json").exists()
    _audited(log, "M3DAssistantLib.cli", "retrieve", str(data_dir / "example_ct_sm.nii.gz"), "--texts", "liver",
             "lung", "--clip-model", str(tiny_clip), "--device", "cpu", "--quiet", env=env)

    from M3DTrainingLib.config import TrainConfig

    run = tmp_path / "run"
    config = TrainConfig.from_dict(dict(
        base_model=str(tiny_phi3), dataset=str(tmp_path / "unused"), output_dir=str(run),
        dataset_factory="training_synthetic:SyntheticM3DDataset", collate_fn="training_synthetic:collate",
        dataset_kwargs={"size": 2}, device="cpu", per_device_batch_size=2, max_steps=2, save_steps=100,
        augment=False))
    config_path = config.to_yaml(tmp_path / "train.yaml")
    _audited(log, "M3DAssistantLib.cli", "train", str(config_path), "--quiet", env=env, timeout=600)
    assert (run / "adapter" / "adapter_model.safetensors").exists()

    events = _events(log)
    assert events, "the audit recorded nothing at all"
    assert [e for e in events if e["kind"] == "network"] == []
    # Libraries' own caches on this machine are fine (torch's inductor folder, matplotlib's font cache).
    caches = [Path(f"/tmp/torchinductor_{getpass.getuser()}"), Path.home() / ".cache", Path.home() / ".config"]
    outside = [p for p in _written_paths(events) if not _inside(p, out, run, tmp_path / "tmp", *caches)]
    assert outside == []
    assert list((tmp_path / "hf-home").iterdir()) == []


ATTACKS = [  # (method, path, body, status): what a hostile or confused client might send; none may touch the disk
    ("GET", "/v1/volumes/..%2F..%2F..%2Fetc%2Fpasswd", None, 404),
    ("GET", "/v1/volumes/../../../etc/passwd", None, 404),
    ("POST", "/v1/volumes/%2Fetc%2Fpasswd/report", b"{}", 404),
    ("POST", "/v1/volumes/{vid}/ask", json.dumps({"question": "hi", "model": "/etc/passwd",
                                                  "output_dir": "/tmp/evil"}).encode(), 400),
    ("POST", "/v1/volumes/{vid}/ask", json.dumps({"question": "file:///etc/passwd"}).encode(), 200),  # just text
    ("POST", "/v1/volumes/{vid}/..%2F..%2Fetc%2Fpasswd", b"{}", 404),
    ("POST", "/v1/retrieve", json.dumps({"text": "liver", "volume_ids": ["../../etc/passwd"]}).encode(), 400),
    ("DELETE", "/v1/volumes/..%2F..%2Fetc", None, 404),
]


@pytest.mark.slow
def test_server_requests_never_reach_the_file_system_and_nothing_leaves_the_machine(tiny_phi3, tiny_clip, ct,
                                                                                       tmp_path):
    """``m3d serve`` (as the Slicer module starts it) answering every task, retrieval, and a battery of path-like
    requests: after it is ready it writes no file and changes nothing on disk, opens nothing a request named, and
    makes no connection beyond loopback."""
    env = _env(tmp_path)
    log = tmp_path / "audit.jsonl"
    proc, ready, _lines, stderr_path = start_server_process(
        ["--model", str(tiny_phi3), "--clip-model", str(tiny_clip), "--device", "cpu", "--dtype", "float32",
         "--port", "0", "--max-volume-mb", "4"], env_extra=env, launcher=[AUDITED, str(log)])
    ready_at = time.time()
    try:
        client = M3DClient(ready["url"], ready["token"], timeout=120)
        array, ijk_to_ras = ct
        client.set_volume(array, ijk_to_ras, window="abdomen")
        centre = ijk_to_ras @ np.array([array.shape[2] / 2, array.shape[1] / 2, array.shape[0] / 2, 1.0])
        client.report(sampling=SHORT)
        client.ask("Is the liver enlarged?", sampling=SHORT)
        client.choose("Which plane?", ["Axial", "Coronal"], sampling=SHORT)
        client.locate("liver", sampling=SHORT)
        client.describe_region(RasRoi(centre[:3], (60.0, 60.0, 40.0)), sampling=SHORT)
        client.segment("liver", sampling=SHORT)
        client.segment_expression("the liver", sampling=SHORT)
        client.retrieve(texts=["liver", "lung"])
        vid = volume_id(array, ijk_to_ras)
        statuses = []
        for method, path, body, _ in ATTACKS:
            conn = http.client.HTTPConnection("127.0.0.1", ready["port"], timeout=60)
            conn.request(method, path.format(vid=vid), body=body, headers={
                "Authorization": f"Bearer {ready['token']}", "Content-Type": "application/json"})
            statuses.append(conn.getresponse().status)
            conn.close()
    finally:
        assert stop_server_process(proc) in (0, -15)
    assert statuses == [a[3] for a in ATTACKS], list(zip([a[1] for a in ATTACKS], statuses))
    assert "Traceback" not in Path(stderr_path).read_text()

    events = _events(log)
    assert [e for e in events if e["kind"] == "network"] == []
    after = [e for e in events if e["t"] >= ready_at]
    assert [e for e in after if e["kind"] == "write"] == []
    assert [e for e in after if any("passwd" in p or "evil" in p for p in e.get("paths", []))] == []
    # What it still reads after start-up is code (lazy imports), system files and the models it was started with
    # (M3D-CLIP loads on first use), never a path a request named.
    roots = [Path(sys.prefix), Path(sys.base_prefix), REPO, Path("/proc"), Path("/sys"), Path("/dev"), Path("/etc"),
             tiny_phi3, tiny_clip]
    assert [p for e in after if e["kind"] == "read" for p in e["paths"] if not _inside(p, *roots)] == []


# ------------------------------------------------------------------------------------------- untrusted files
class _RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: what a hostile ``pytorch_model.bin`` could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_pickled_checkpoint_cannot_run_code(tiny_phi3, tmp_path):
    """A ``.bin`` checkpoint is read with ``weights_only=True``: a pickle that would run code is refused with an error
    naming the file, and the code does not run."""
    import shutil

    import torch

    from M3DAssistantLib.errors import CheckpointError
    from M3DAssistantLib.model import load_model

    folder = tmp_path / "hostile"
    shutil.copytree(tiny_phi3, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": _RunsCode(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(folder, device="cpu", dtype="float32")
    assert not marker.exists()


UNSAFE_CALLS = {  # call -> the keyword that makes it safe (None: never allowed)
    "torch.load": ("weights_only", True),
    "pickle.load": None, "pickle.loads": None, "dill.load": None, "cloudpickle.load": None,
    "yaml.load": None, "yaml.unsafe_load": None, "eval": None, "exec": None,
    "np.load": ("allow_pickle", False), "numpy.load": ("allow_pickle", False),
}


def _call_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_call_name(node.value)}.{node.attr}"
    return ""


def test_no_unsafe_deserialisation_in_the_product():
    """No pickle, no eval/exec, no ``yaml.load``; ``torch.load`` only with ``weights_only=True``; ``np.load`` never
    with ``allow_pickle=True`` — in every product source file (the modules, their libraries, the utilities)."""
    sources = [p for folder in ("M3DAssistant", "M3DTraining", "Utilities") for p in (REPO / folder).rglob("*.py")]
    assert len(sources) > 30
    found = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.Call) or _call_name(node.func) not in UNSAFE_CALLS:
                continue
            rule = UNSAFE_CALLS[_call_name(node.func)]
            keywords = {k.arg: k.value for k in node.keywords}
            if rule is None:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {_call_name(node.func)}")
            elif rule[1] is True and not (isinstance(keywords.get(rule[0]), ast.Constant)
                                          and keywords[rule[0]].value is True):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {_call_name(node.func)} without {rule[0]}=True")
            elif rule[1] is False and isinstance(keywords.get(rule[0]), ast.Constant) and keywords[rule[0]].value:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {_call_name(node.func)} with {rule[0]}=True")
    assert found == []
