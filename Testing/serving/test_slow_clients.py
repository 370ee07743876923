"""Slow and stalled clients against ``m3d serve`` (serving/connections.py): partial headers (slowloris), stalled and
dripped uploads, too many connections. The app runs in this process on 127.0.0.1 with the uvicorn settings m3d serve
uses (``uvicorn_config``) and short timeouts; every socket here is loopback, few (at most 40), and closed by the test
within seconds."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time

import numpy as np
import pytest
from serving import serve_in_thread, wait_for

from M3DAssistantLib.serving.server import create_app

TOKEN = "slow-clients-token-0123456789abcdef0123456789"
SHAPE = (8, 256, 256)  # int16: 1 MiB
NBYTES = int(np.prod(SHAPE)) * 2
MATRIX = ",".join(map(str, np.eye(4).ravel()))


class _Engine:
    """Enough of an engine for the upload and health routes (no model is needed to receive volumes)."""

    def info(self) -> dict:
        return {"model": "none"}


@contextlib.contextmanager
def server(**limits):
    options = dict(max_volume_bytes=1 << 20, max_stored_bytes=2 << 20, header_timeout_s=1.0, body_timeout_s=1.0,
                   min_body_bytes_per_s=10_000)
    options.update(limits)
    app = create_app(_Engine(), TOKEN, **options)
    with serve_in_thread(app) as (_url, port):
        yield port, app


@contextlib.contextmanager
def raw_sockets(port: int, count: int):
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def upload_head(length: int = NBYTES) -> bytes:
    return (f"POST /v1/volumes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/octet-stream\r\nX-M3D-Shape: {','.join(map(str, SHAPE))}\r\n"
            f"X-M3D-Dtype: int16\r\nX-M3D-Compression: none\r\nX-M3D-IJK-To-RAS: {MATRIX}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def upload(port: int, fill: int = 0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/volumes", body=bytes([fill]) * NBYTES, headers={
            "Authorization": f"Bearer {TOKEN}", "X-M3D-Shape": ",".join(map(str, SHAPE)), "X-M3D-Dtype": "int16",
            "X-M3D-Compression": "none", "X-M3D-IJK-To-RAS": MATRIX})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def health(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/v1/health", headers={"Authorization": f"Bearer {TOKEN}"})
        return conn.getresponse().status
    finally:
        conn.close()


def closed_within(sock: socket.socket, seconds: float, drip: bytes = b"") -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``seconds`` (dripping ``drip`` every 0.2 s meanwhile), and what it
    answered."""
    received, deadline = b"", time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if drip:
                sock.sendall(drip)
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def test_partial_headers_are_closed_after_the_header_timeout():
    """case: connections that send partial headers, or drip them a byte at a time, or nothing, authenticated or not
    (slowloris) -> closed with 408 after --header-timeout; other clients are served meanwhile"""
    with server() as (port, _app), raw_sockets(port, 8) as socks:
        start = time.monotonic()
        for i, sock in enumerate(socks):
            if i % 2:
                sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert health(port) == 200  # served while the stalled ones wait
        results = [closed_within(sock, 5.0, drip=b"X-Slow: 1\r\n" if i % 4 == 1 else b"") for i, sock in
                   enumerate(socks)]
        assert all(closed for closed, _ in results), results
        assert all(answer.startswith(b"HTTP/1.1 408 Request Timeout") for _, answer in results), results
        assert time.monotonic() - start < 4.0  # the deadline is absolute: dripping does not extend it
        assert health(port) == 200


def test_stalled_uploads_release_the_upload_budget():
    """case: authenticated uploads that stall after ~100 kB (reserving the whole upload budget) -> others get 503
    only until --body-timeout closes the stalled ones; their budget is released and the next upload succeeds"""
    with server() as (port, app), raw_sockets(port, 2) as stalled:
        for sock in stalled:  # two uploads of 1 MiB each reserve the 2 MiB budget, then stall
            sock.sendall(upload_head() + b"\0" * 100_000)
        time.sleep(0.3)
        status, answer = upload(port)
        assert status == 503 and answer["error"] == "ServerBusyError", answer
        assert all(closed_within(sock, 5.0)[0] for sock in stalled)
        wait_for(lambda: app.state.m3d.store._uploading == 0, 5.0)  # the budget is back
        status, answer = upload(port, fill=1)
        assert status == 201 and answer["bytes"] == NBYTES, answer
        assert len(app.state.m3d.store) == 1  # the stalled uploads stored nothing


def test_a_dripped_upload_is_closed_for_its_rate():
    """case: an upload dripped a few bytes at a time (never idle long enough for the idle timeout) -> closed once its
    mean rate stays under the minimum after --body-timeout"""
    with server(body_timeout_s=1.0, min_body_bytes_per_s=10_000) as (port, app), raw_sockets(port, 1) as (sock,):
        sock.sendall(upload_head())
        start = time.monotonic()
        closed, _ = closed_within(sock, 6.0, drip=b"\0" * 16)
        assert closed and time.monotonic() - start < 5.0
        wait_for(lambda: app.state.m3d.store._uploading == 0, 5.0)


def test_connection_limits_per_client_and_in_all():
    """case: more open connections than --max-connections-per-client (or --max-connections) -> 503 'too many
    connections' naming the limit, the connection closed; served again once they are closed"""
    with server(header_timeout_s=30.0, max_connections_per_client=5, max_connections=64) as (port, _app):
        with raw_sockets(port, 5) as idle:
            time.sleep(0.2)
            with raw_sockets(port, 1) as (extra,):
                closed, answer = closed_within(extra, 3.0)
            assert closed and answer.startswith(b"HTTP/1.1 503"), answer
            detail = json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
            assert "too many connections" in detail and "at most 5 per client" in detail
            for sock in idle:
                assert not closed_within(sock, 0.05)[0]  # the earlier ones are untouched
        time.sleep(0.3)
        assert health(port) == 200
    with server(header_timeout_s=30.0, max_connections=3, max_connections_per_client=32) as (port, _app):
        with raw_sockets(port, 3):
            time.sleep(0.2)
            with raw_sockets(port, 1) as (extra,):
                closed, answer = closed_within(extra, 3.0)
        assert closed and b"at most 3)" in answer, answer


def test_a_slow_but_steady_upload_is_not_cut():
    """The unforced twin: a client on a slow line (above the minimum rate) finishes its upload."""
    with server(body_timeout_s=1.0, min_body_bytes_per_s=10_000) as (port, app), raw_sockets(port, 1) as (sock,):
        sock.sendall(upload_head())
        body = b"\2" * NBYTES
        sent, start = 0, time.monotonic()
        while sent < len(body):  # ~100 kB/s: 10 chunks per second
            sock.sendall(body[sent:sent + 10_000])
            sent += 10_000
            time.sleep(0.05)
        sock.settimeout(10)
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 201"), answer
        assert time.monotonic() - start > 1.0  # it did take longer than the body timeout


def test_the_cli_flags_reach_the_server(monkeypatch):
    from M3DAssistantLib.serving import server as server_module

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda *a, **k: seen.update(k))
    parser = server_module.add_serve_arguments(__import__("argparse").ArgumentParser())
    server_module.run_serve(parser.parse_args(["--header-timeout", "3", "--body-timeout", "7", "--max-connections",
                                               "20", "--max-connections-per-client", "4"]))
    assert {k: seen["limits"][k] for k in ("header_timeout_s", "body_timeout_s", "max_connections",
                                           "max_connections_per_client")} == {
        "header_timeout_s": 3.0, "body_timeout_s": 7.0, "max_connections": 20, "max_connections_per_client": 4}


@pytest.mark.parametrize("field", ["header_timeout_s", "body_timeout_s", "max_connections_per_client"])
def test_the_limits_are_published(field):
    app = create_app(_Engine(), TOKEN)
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://127.0.0.1") as tc:
        info = tc.get("/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert field in info["limits"]
