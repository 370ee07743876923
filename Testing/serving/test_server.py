"""m3d serve + M3DClient end to end over real HTTP on 127.0.0.1, with the tiny checkpoint and the real test CT.

* ``server`` runs ``python -m M3DAssistantLib.serving --port 0`` in a subprocess (as the Slicer module does) and reads
  its ready line; every task, streaming, auth, limits, queueing, cancel and concurrency go through it.
* ``local_server`` runs the same app in this process (uvicorn in a thread, still real HTTP on loopback) around an
  engine whose answers a test can force (random weights never say [SEG] or a box), and is the target of the bounded
  schemathesis run.
* ``fastapi.testclient`` covers the quick error paths.

Every server binds 127.0.0.1 only; every loop here is bounded.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from forcing import force_answer
from serving import serve_in_thread, start_server_process, stop_server_process, wait_for

from M3DAssistantLib import AI_LABEL
from M3DAssistantLib.errors import CancelledError, GeometryError, InputError
from M3DAssistantLib.geometry import RasRoi
from M3DAssistantLib.results import BoxResult, ChoiceResult, SamplingOptions, SegmentationResult, TextResult
from M3DAssistantLib.serving import client as client_module
from M3DAssistantLib.serving.client import (
    PROTOCOL_VERSION,
    AuthenticationError,
    M3DClient,
    ProtocolMismatchError,
    RequestTooLargeError,
    ServerBusyError,
    ServerUnavailableError,
    volume_id,
)
from M3DAssistantLib.serving.protocol import decode_mask, encode_mask
from M3DAssistantLib.serving.server import is_loopback, serve

SHORT = SamplingOptions(max_new_tokens=6)
# the task routes are derived from the task registry; users' scripts depend on these exact names
TASK_ROUTES = ("report", "ask", "choose", "locate", "describe_region", "segment", "segment_expression")
LONG = SamplingOptions(max_new_tokens=512, min_new_tokens=512)  # 1-10 s on the tiny model: only ever cancelled


def _roi_in(ct, size=(60.0, 60.0, 40.0)) -> RasRoi:
    array, ijk_to_ras = ct
    centre = ijk_to_ras @ np.array([array.shape[2] / 2, array.shape[1] / 2, array.shape[0] / 2, 1.0])
    return RasRoi(centre[:3], size)


# ------------------------------------------------------------------------------------------ subprocess server
SERVER_ARGS = ["--device", "cpu", "--dtype", "float32", "--port", "0", "--max-queue", "1", "--max-upload-mb", "1",
               "--max-volume-mb", "1", "--max-new-tokens-limit", "512"]


@pytest.fixture(scope="module")
def server(tiny_phi3, tiny_clip):
    proc, ready, _lines, stderr_path = start_server_process(["--model", str(tiny_phi3), "--clip-model", str(tiny_clip),
                                               *SERVER_ARGS])
    yield dict(ready, proc=proc, stderr=stderr_path)
    assert stop_server_process(proc) in (0, -signal.SIGTERM)  # uvicorn shuts down cleanly, then re-raises the signal
    assert "Traceback" not in open(stderr_path).read(), open(stderr_path).read()[-3000:]


@pytest.fixture
def client(server, ct):
    c = M3DClient(server["url"], server["token"], timeout=60)
    c.set_volume(*ct, window="abdomen")
    return c


def _raw(server, method, path, body=None, headers=None, token="__default__"):
    """One request with http.client (no client-side checks): (status, headers, JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    hdrs = dict(headers or {})
    if token == "__default__":
        hdrs["Authorization"] = f"Bearer {server['token']}"
    elif token is not None:
        hdrs["Authorization"] = token
    try:
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = raw.decode("utf-8", "replace")
    return response.status, dict(response.getheaders()), data


def _upload_headers(shape, dtype="int16", matrix=None, compression="zlib"):
    matrix = np.eye(4) if matrix is None else matrix
    return {"Content-Type": "application/octet-stream", "X-M3D-Shape": ",".join(map(str, shape)),
            "X-M3D-Dtype": dtype, "X-M3D-IJK-To-RAS": ",".join(repr(float(v)) for v in np.ravel(matrix)),
            "X-M3D-Compression": compression}


def test_ready_line_handshake_and_info(server, tiny_phi3):
    assert server["protocol"] == PROTOCOL_VERSION and server["pid"] == server["proc"].pid
    assert server["port"] > 0 and server["url"] == f"http://127.0.0.1:{server['port']}"
    assert len(server["token"]) >= 32  # generated, so it is in the ready line
    c = M3DClient(server["url"], server["token"])
    assert c.health()["status"] == "ok"
    info = c.info()
    assert info["protocol"] == PROTOCOL_VERSION and info["server_version"] and info["label"] == AI_LABEL
    assert info["model"] == str(tiny_phi3) and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["limits"]["max_queue"] == 1 and info["limits"]["max_volume_bytes"] == 1 << 20


def test_upload_once_by_content_hash(server, ct):
    array, ijk_to_ras = ct
    mine = array[::-1].copy()  # content no other test uploads
    c = M3DClient(server["url"], server["token"])
    first = c.set_volume(mine, ijk_to_ras)
    assert first.uploaded and first.volume_id == volume_id(mine, ijk_to_ras) and first.shape == mine.shape
    second = M3DClient(server["url"], server["token"]).set_volume(mine.copy(), ijk_to_ras, window="lung")
    assert not second.uploaded and second.volume_id == first.volume_id  # the server already has it
    status, _, described = _raw(server, "GET", f"/v1/volumes/{first.volume_id}")
    assert status == 200 and described["shape"] == list(mine.shape) and described["dtype"] == "int16"
    c.forget_volume()
    assert not c.has_volume(first.volume_id)
    assert _raw(server, "DELETE", f"/v1/volumes/{first.volume_id}")[0] == 404


def test_every_task_through_the_client_equals_the_engine(client, ct, tiny_phi3_model):
    """Greedy answers over HTTP are the in-process engine's, for every task; results are rebuilt as dataclasses."""
    from M3DAssistantLib.engine import InferenceEngine

    engine = InferenceEngine(tiny_phi3_model)
    engine.set_volume(*ct, window="abdomen")
    roi = _roi_in(ct)
    calls = [
        ("report", (), TextResult),
        ("ask", ("Is the liver enlarged?",), TextResult),
        ("choose", ("Which plane is this?", ["Axial", "Coronal", "Sagittal", "Oblique"]), ChoiceResult),
        ("locate", ("liver",), BoxResult),
        ("describe_region", (roi,), TextResult),
        ("segment", ("liver",), SegmentationResult),
        ("segment_expression", ("the large organ in the right upper abdomen",), SegmentationResult),
    ]
    for method, args, cls in calls:
        remote = getattr(client, method)(*args, sampling=SHORT)
        local = getattr(engine, method)(*args, sampling=SHORT)
        assert type(remote) is cls, method
        assert remote.text == local.text, method
        assert remote.provenance.prompt == local.provenance.prompt and remote.provenance.label == AI_LABEL
        assert remote.provenance.convention == local.provenance.convention
        assert remote.provenance.sampling == local.provenance.sampling
    history = [("What organ is this?", "The liver.")]
    assert client.ask("Is it enlarged?", history, sampling=SHORT).text == \
        engine.ask("Is it enlarged?", history, sampling=SHORT).text


def test_retrieval_equals_the_engine(client, ct, tiny_phi3_model, tiny_clip):
    from M3DAssistantLib.engine import InferenceEngine

    engine = InferenceEngine(tiny_phi3_model, clip_model=tiny_clip)
    engine.set_volume(*ct, window="abdomen")
    texts = ["liver lesion", "normal chest CT", "fracture of the femur"]
    remote, local = client.retrieve(texts=texts, labels=["a", "b", "c"]), engine.retrieve(texts=texts,
                                                                                          labels=["a", "b", "c"])
    assert [r[:2] for r in remote.ranking] == [r[:2] for r in local.ranking]
    np.testing.assert_allclose([r[2] for r in remote.ranking], [r[2] for r in local.ranking], rtol=1e-5, atol=1e-6)
    assert remote.provenance.model == str(tiny_clip) and remote.query == local.query
    array, ijk_to_ras = ct
    volumes = [(array, ijk_to_ras), (array[::-1].copy(), ijk_to_ras), (array[:, ::-1].copy(), ijk_to_ras)]
    remote = client.retrieve(text="liver lesion", volumes=volumes)
    local = engine.retrieve(text="liver lesion", volumes=volumes)
    assert [r[:2] for r in remote.ranking] == [r[:2] for r in local.ranking]
    np.testing.assert_allclose([r[2] for r in remote.ranking], [r[2] for r in local.ranking], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="retrieve needs"):
        client.retrieve()


def test_streaming_text_progress_and_stream_iterator(client):
    chunks, events = [], []
    streamed = client.report(sampling=SamplingOptions(max_new_tokens=10), on_text=chunks.append,
                             on_progress=events.append)
    plain = client.report(sampling=SamplingOptions(max_new_tokens=10))
    assert chunks and "".join(chunks) == streamed.text == plain.text
    assert {e.stage for e in events} >= {"generate"} and events[-1].fraction == pytest.approx(1.0)
    *items, result = list(client.stream("ask", "What is shown?", sampling=SamplingOptions(max_new_tokens=8)))
    assert all(isinstance(i, str) for i in items) and "".join(items) == result.text


ROUTES = [("GET", "/v1/health"), ("GET", "/v1/info"), ("GET", "/v1/openapi.json"), ("POST", "/v1/volumes"),
          ("GET", "/v1/volumes/" + "0" * 32), ("DELETE", "/v1/volumes/" + "0" * 32), ("POST", "/v1/cancel"),
          ("GET", "/v1/nothing-here"), ("GET", "/docs"), ("POST", "/v1/retrieve"),
          ("POST", f"/v1/volumes/{'0' * 32}/retrieve")] + [
    ("POST", f"/v1/volumes/{'0' * 32}/{task}") for task in TASK_ROUTES]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Basic dXNlcjpwYXNz", "Bearer", "bearer  "])
def test_every_route_needs_the_token(server, auth):
    for method, path in ROUTES:
        status, headers, body = _raw(server, method, path, body=b"{}", token=auth,
                                     headers={"Content-Type": "application/json"})
        assert status == 401, (method, path, status, body)
        assert body["error"] == "AuthenticationError" and "Authorization: Bearer" in body["detail"]
        assert headers.get("www-authenticate") == "Bearer"
    with pytest.raises(AuthenticationError, match="refused the token"):
        M3DClient(server["url"], "wrong-token").info()


def test_token_scheme_is_case_insensitive(server):
    assert _raw(server, "GET", "/v1/health", token=f"bearer {server['token']}")[0] == 200


def test_too_large_uploads_are_refused_before_allocation(server, ct):
    # declared shape over the voxel limit (1 MiB here): refused from the headers alone
    status, _, body = _raw(server, "POST", "/v1/volumes", body=b"x",
                           headers=_upload_headers((2000, 2000, 1000), "float64"))
    assert status == 413 and "MiB" in body["detail"] and body["error"] == "RequestTooLargeError"
    status, _, body = _raw(server, "POST", "/v1/volumes", body=b"x", headers=_upload_headers((5000, 1, 1)))
    assert status == 413 and "along any axis" in body["detail"]
    # body over the upload limit (1 MiB): refused from Content-Length
    big = b"\0" * ((1 << 20) + 10)
    status, _, body = _raw(server, "POST", "/v1/volumes", body=big, headers=_upload_headers((64, 64, 64), "float32",
                                                                                             compression="none"))
    assert status == 413 and "--max-upload-mb" in body["detail"]
    # JSON routes have their own (1 MiB) limit
    status, _, body = _raw(server, "POST", f"/v1/volumes/{'0' * 32}/ask", body=b" " * (2 << 20),
                           headers={"Content-Type": "application/json"})
    assert status == 413
    # the client checks the limits it got in the handshake before sending anything
    array, ijk_to_ras = ct
    with pytest.raises(RequestTooLargeError, match="--max-volume-mb"):
        M3DClient(server["url"], server["token"]).set_volume(np.tile(array, (3, 1, 1)), ijk_to_ras)


def test_uploads_are_compressed_while_sent_and_stop_at_the_upload_limit(tiny_phi3_model):
    """The client never holds the whole compressed volume: it streams zlib chunks (chunked transfer) that the server
    inflates as they come; past the server's upload limit it stops with the limit and the flag to change."""
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.serving.server import create_app

    token = "upload-test-token-0123456789"
    app = create_app(InferenceEngine(tiny_phi3_model), token, max_volume_bytes=8 << 20, max_upload_bytes=256 << 10)
    rng = np.random.default_rng(0)
    with serve_in_thread(app) as (url, _port):
        c = M3DClient(url, token)
        noise = rng.random((16, 128, 128)).astype(np.float32)  # 1 MiB that zlib cannot shrink
        with pytest.raises(RequestTooLargeError, match="accepts uploads of at most 0.2 MiB.*--max-upload-mb"):
            c.set_volume(noise, np.eye(4))
        assert len(app.state.m3d.store) == 0 and c.health()["status"] == "ok"
        ct_like = np.full((128, 128, 128), -1000, np.int16)  # 4 MiB that compress well
        ct_like[20:100, 30:100, 30:100] = 40 + np.arange(70, dtype=np.int16) % 7
        chunks = list(c._compressed_chunks(ct_like, np.inf, chunk_bytes=1 << 20))
        assert len(chunks) >= 2 and zlib.decompress(b"".join(chunks)) == ct_like.tobytes()
        c.set_volume(ct_like, np.eye(4))
        stored = app.state.m3d.store.get(volume_id(ct_like, np.eye(4)))
        assert stored is not None and np.array_equal(stored.array, ct_like)


def test_https_with_a_self_signed_certificate(tiny_phi3, ct, tmp_path):
    """``--ssl-certfile``: the server speaks only TLS and says https in its ready line; a client that trusts the
    certificate (ca_file) gets answers, one that does not gets an error saying what to pass; a bad certificate file
    is refused before the model loads."""
    import trustme

    ca = trustme.CA()
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    args = ["--model", str(tiny_phi3), "--device", "cpu", "--dtype", "float32", "--port", "0"]
    proc, ready, _, stderr_path = start_server_process([*args, "--ssl-certfile", str(tmp_path / "server.pem")])
    try:
        assert ready["url"] == f"https://127.0.0.1:{ready['port']}"
        trusted = M3DClient(ready["url"], ready["token"], ca_file=str(tmp_path / "ca.pem"))
        trusted.set_volume(*ct, window="abdomen")
        assert isinstance(trusted.report(sampling=SHORT), TextResult)
        with pytest.raises(ServerUnavailableError, match="TLS connection .* failed .*pass its certificate file as "
                                                         "ca_file"):
            M3DClient(ready["url"], ready["token"]).health()
        with pytest.raises(ServerUnavailableError):  # plain http to a TLS port: no answer, no data
            M3DClient(ready["url"].replace("https", "http"), ready["token"], connect_timeout=5).health()
    finally:
        assert stop_server_process(proc) in (0, -signal.SIGTERM)
    assert "Traceback" not in open(stderr_path).read()

    (tmp_path / "not-a-cert.pem").write_text("hello")
    result = subprocess.run([sys.executable, "-m", "M3DAssistantLib.serving", *args, "--ssl-certfile",
                             str(tmp_path / "not-a-cert.pem")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "cannot use the TLS certificate" in result.stderr
    assert "M3D_SERVER_READY" not in result.stdout
    with pytest.raises(InputError, match="--ssl-keyfile needs --ssl-certfile"):
        serve(str(tiny_phi3), device="cpu", ssl_keyfile=str(tmp_path / "server.pem"))


def test_chunked_bodies_are_counted_too(server):
    """Without Content-Length the limit is enforced while reading."""
    def chunks(total, size=64 * 1024):
        for _ in range(total // size):
            yield b" " * size

    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    try:
        conn.request("POST", f"/v1/volumes/{'0' * 32}/ask", body=chunks(2 << 20), encode_chunked=True,
                     headers={"Authorization": f"Bearer {server['token']}", "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 413 and "at most" in json.loads(response.read())["detail"]
    finally:
        conn.close()


def test_unknown_volume_is_404_and_malformed_id_400(server, client):
    missing = "f" * 32
    assert not client.has_volume(missing)
    status, _, body = _raw(server, "POST", f"/v1/volumes/{missing}/report", body=b"{}",
                           headers={"Content-Type": "application/json"})
    assert status == 404 and body["error"] == "VolumeNotFoundError" and "upload it" in body["detail"]
    status, _, body = _raw(server, "POST", "/v1/volumes/../../etc/passwd/report", body=b"{}")
    assert status in (400, 404) and body["error"] != "InternalError"
    status, _, body = _raw(server, "GET", "/v1/volumes/not-a-hash")
    assert status == 400 and "volume_id" in body["detail"]


def test_client_reuploads_a_volume_the_server_lost(server, ct):
    array, ijk_to_ras = ct
    mine = (array // 2).astype(np.int16)
    c = M3DClient(server["url"], server["token"])
    remote = c.set_volume(mine, ijk_to_ras)
    assert _raw(server, "DELETE", f"/v1/volumes/{remote.volume_id}")[0] == 204
    assert isinstance(c.report(sampling=SHORT), TextResult)  # 404 -> upload again -> answer
    assert c.has_volume(remote.volume_id)
    c.forget_volume()


@pytest.mark.parametrize("call,message,cls", [
    (lambda c: c.choose("Which organ?", ["Liver"]), "between 2 and 8", InputError),
    (lambda c: c.choose("Which organ?", ["Liver", "liver"]), "duplicates", InputError),
    (lambda c: c.ask("   "), "empty", InputError),
    (lambda c: c.ask("x" * 100_000), "token", InputError),
    (lambda c: c.report(sampling=SamplingOptions(max_new_tokens=600)), "server's limit 512", InputError),
    (lambda c: c.describe_region(RasRoi([1e4, 1e4, 1e4], [5, 5, 5])), "ROI", GeometryError),
])
def test_bad_input_is_400_with_the_message(client, call, message, cls):
    with pytest.raises(cls, match=message):
        call(client)


def test_bad_input_raw(server, client, ct):
    vid = client._volume.remote.volume_id
    json_headers = {"Content-Type": "application/json"}
    cases = [
        (b'{"question": "Why?", "colour": 1}', "ask", "colour"),  # unknown field
        (b'{"question": ', "ask", "JSON"),  # malformed JSON
        (b'{"question": "Why?", "window": "pink"}', "ask", "unknown intensity window"),
        (b'{"question": "Why?", "window": [40, -1]}', "ask", "width"),
        (b'{"question": "Why?", "slice_range": [20, 10]}', "ask", "slice_range"),
        (b'{"region": {"center": [NaN, 0, 0], "size": [1, 1, 1]}}', "describe_region", "region.center"),
        (b'{"region": {"center": [0, 0, 0], "size": [1, 1, 1], "axes": [[1, 0, 0], [1, 0, 0], [0, 0, 1]]}}',
         "describe_region", "orthonormal"),
        (b'{"target": 5}', "segment", "target"),
        (b'{"sampling": {"temperature": 0}}', "report", "temperature"),
        (b'\xff\xfe\x00', "ask", ""),  # not UTF-8
    ]
    for body, task, message in cases:
        status, _, answer = _raw(server, "POST", f"/v1/volumes/{vid}/{task}", body=body, headers=json_headers)
        assert status == 400, (body, status, answer)
        assert message in answer["detail"], (body, answer)
    array, ijk_to_ras = ct
    raw = np.ascontiguousarray(array[:4]).tobytes()
    uploads = [
        (zlib.compress(raw), _upload_headers((4,) + array.shape[1:], "complex64"), "X-M3D-Dtype"),
        (zlib.compress(raw), _upload_headers((4, 101), "int16"), "X-M3D-Shape"),
        (b"not zlib at all", _upload_headers((4,) + array.shape[1:], "int16"), "zlib"),
        (zlib.compress(raw[:-2]), _upload_headers((4,) + array.shape[1:], "int16"), "declare"),
        (zlib.compress(raw + b"\0\0"), _upload_headers((4,) + array.shape[1:], "int16"), "more than"),
        (zlib.compress(raw) + b"junk", _upload_headers((4,) + array.shape[1:], "int16"), "after the end"),
        (zlib.compress(raw), _upload_headers((4,) + array.shape[1:], "int16", np.zeros((4, 4))), "IJK->RAS"),
        (raw, _upload_headers((4,) + array.shape[1:], "int16", compression="brotli"), "X-M3D-Compression"),
    ]
    for body, headers, message in uploads:
        status, _, answer = _raw(server, "POST", "/v1/volumes", body=body, headers=headers)
        assert status == 400 and message in answer["detail"], (headers, answer)
    status, _, answer = _raw(server, "POST", "/v1/volumes", body=raw, headers=_upload_headers(
        (4,) + array.shape[1:], "<i2", ijk_to_ras, compression="none"))
    assert status == 201 and answer["volume_id"] == volume_id(array[:4], ijk_to_ras)


def test_cancel_a_streamed_answer(client):
    seen = []

    def on_text(chunk):
        seen.append(chunk)
        if len(seen) == 1:
            client.cancel()

    started = time.monotonic()
    with pytest.raises(CancelledError):
        client.report(sampling=LONG, on_text=on_text)
    assert seen and time.monotonic() - started < 5  # stopped long before 400 tokens
    assert isinstance(client.report(sampling=SHORT), TextResult)  # the next request runs normally


def test_a_stream_whose_client_goes_away_is_cancelled(server, client):
    vid = client._volume.remote.volume_id
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    body = json.dumps({"window": "abdomen", "sampling": dataclasses.asdict(LONG)})
    conn.request("POST", f"/v1/volumes/{vid}/report?stream=true", body=body,
                 headers={"Authorization": f"Bearer {server['token']}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"event: ")
    wait_for(lambda: client.health()["running"] == "report")
    response.close()
    conn.close()  # Slicer closed, or the user switched volumes
    started = time.monotonic()
    wait_for(lambda: client.health()["running"] is None, timeout=10)
    assert time.monotonic() - started < 5  # cancelled, not run to its 400 tokens


def test_queue_full_is_503_and_cancel_reaches_running_and_queued(server, ct):
    """max_queue=1: one runs, one waits, the third gets 503; cancel stops both (the waiting one never runs)."""
    clients = [M3DClient(server["url"], server["token"], timeout=60) for _ in range(3)]
    for c in clients:
        c.set_volume(*ct, window="abdomen")
    outcomes: dict[int, BaseException] = {}
    queued_events = []

    def run(i):
        try:  # the second one streams: its first event says it waits
            clients[i].report(sampling=LONG, on_progress=queued_events.append if i == 1 else None)
        except BaseException as e:  # noqa: BLE001 - collected for the asserts
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    threads[0].start()
    wait_for(lambda: clients[2].health()["running"] == "report")
    threads[1].start()
    wait_for(lambda: clients[2].health()["waiting"] == 1)
    with pytest.raises(ServerBusyError, match="busy"):
        clients[2].ask("Anything?", sampling=SHORT)
    clients[1].cancel()  # the queued one
    threads[1].join(10)
    assert isinstance(outcomes.get(1), CancelledError) and "waiting" in str(outcomes[1])
    assert [(e.stage, e.message) for e in queued_events] == [("queue", "1 request(s) ahead")]
    clients[0].cancel()  # the running one
    threads[0].join(10)
    assert isinstance(outcomes.get(0), CancelledError)
    assert clients[2].health() == {"status": "ok", "protocol": PROTOCOL_VERSION, "running": None, "waiting": 0}


def test_cancel_everything_from_another_client(server, client):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("r", _catch(client.report, sampling=LONG)))
    thread.start()
    wait_for(lambda: client.health()["running"] == "report")
    other = M3DClient(server["url"], server["token"])
    assert other.cancel() == {"cancelled": []}  # nothing of its own
    assert len(other.cancel(everything=True)["cancelled"]) == 1
    thread.join(10)
    assert isinstance(outcome["r"], CancelledError)


def _catch(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001
        return e


def test_two_concurrent_clients_get_their_own_answers(server, ct):
    """Two clients with different volumes and windows at once: each answer equals the same request served alone."""
    array, ijk_to_ras = ct
    volumes = [(array, ijk_to_ras, "abdomen"), (array[:, ::-1].copy(), ijk_to_ras, "lung")]
    work = [("report", ()), ("ask", ("What is abnormal?",)), ("locate", ("kidney",))]
    sampling = SamplingOptions(max_new_tokens=8)

    def session(c, volume):
        c.set_volume(volume[0], volume[1], window=volume[2])
        results = [getattr(c, m)(*a, sampling=sampling) for m, a in work]
        # the text, and what shows that this request's own volume and window were used
        return [(r.text, r.provenance.prompt, r.provenance.intensity, r.provenance.convention) for r in results]

    alone = [session(M3DClient(server["url"], server["token"]), v) for v in volumes]
    assert alone[0] != alone[1]  # different inputs: a mix-up would show
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i: results.setdefault(i, _catch(
        session, M3DClient(server["url"], server["token"], timeout=60), volumes[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {0: alone[0], 1: alone[1]}


def test_protocol_mismatch_names_both_versions(server, monkeypatch):
    monkeypatch.setattr(client_module, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    with pytest.raises(ProtocolMismatchError, match=rf"protocol {PROTOCOL_VERSION} .* protocol "
                                                    rf"{PROTOCOL_VERSION + 1}.*same m3d-slicer version"):
        M3DClient(server["url"], server["token"]).info()


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(ServerUnavailableError, match="m3d serve"):
            M3DClient(f"http://127.0.0.1:{port}", "t", connect_timeout=2).health()


def test_port_taken_is_a_clear_error(server, tiny_phi3):
    result = subprocess.run([sys.executable, "-m", "M3DAssistantLib.serving", "--model", str(tiny_phi3),
                             "--port", str(server["port"])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"port {server['port']}" in result.stderr and "in use" in result.stderr
    assert "M3D_SERVER_READY" not in result.stdout


def test_remote_bind_needs_the_flag_and_a_token(tmp_path):
    # refused before binding or loading anything (no model is given: loading would fail differently)
    with pytest.raises(InputError, match="--allow-remote"):
        serve(host="0.0.0.0")
    with pytest.raises(InputError, match="explicit token"):
        serve(host="0.0.0.0", allow_remote=True)
    with pytest.raises(InputError, match="as strong as a generated one"):
        serve(host="192.0.2.1", allow_remote=True, token="short")
    with pytest.raises(InputError, match="visible ASCII"):
        serve(token="has space")
    result = subprocess.run([sys.executable, "-m", "M3DAssistantLib.serving", "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "refusing to listen on '0.0.0.0'" in result.stderr
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.org")


def test_given_token_is_not_printed_and_the_worker_follows_its_parent(tiny_phi3):
    """A token from $M3D_SERVER_TOKEN stays out of the output; --parent-pid stops the worker when Slicer is gone."""
    token = "a-token-the-user-chose-0123456789"
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc, ready, _, stderr_path = start_server_process(
        ["--model", str(tiny_phi3), "--device", "cpu", "--dtype", "float32", "--parent-pid", str(parent.pid)],
        env_extra={"M3D_SERVER_TOKEN": token})
    try:
        assert "token" not in ready
        assert M3DClient(ready["url"], token).health()["status"] == "ok"
        parent.kill()
        parent.wait(10)
        assert proc.wait(15) == 0  # stopped by itself, cleanly
    finally:
        if proc.poll() is None:
            stop_server_process(proc)
        if parent.poll() is None:
            parent.kill()
    assert token not in open(stderr_path).read()


def test_client_timeout_cancels_the_request(server, client, ct):
    impatient = M3DClient(server["url"], server["token"], timeout=0.25)  # far below LONG's decoding time
    impatient.set_volume(*ct, window="abdomen")
    with pytest.raises(ServerUnavailableError, match="within 0.25 s; the request was cancelled"):
        impatient.report(sampling=LONG)
    wait_for(lambda: client.health()["running"] is None, timeout=10)


def test_light_modules_stay_light():
    """Slicer's process imports the client; the CLI imports server.py to register its options: neither may pull in
    torch, transformers, FastAPI, pydantic, uvicorn, httpx or requests."""
    code = ("import sys, M3DAssistantLib.serving.client, M3DAssistantLib.serving.server; "
            "heavy = {'torch', 'transformers', 'fastapi', 'pydantic', 'uvicorn', 'starlette', 'httpx', 'requests'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


# ------------------------------------------------------------------------------- in-process server, forced answers
@pytest.fixture(scope="module")
def local_server(tiny_phi3_model, tiny_clip):
    """The app in this process (uvicorn in a thread) on 127.0.0.1, for forced answers and the schema fuzz."""
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.serving.server import create_app

    engine = InferenceEngine(tiny_phi3_model, clip_model=tiny_clip)
    token = "local-test-token-0123456789"
    app = create_app(engine, token, max_queue=4, max_new_tokens=40, max_volume_bytes=4 << 20)
    with serve_in_thread(app) as (url, port):
        yield {"url": url, "port": port, "token": token, "engine": engine, "app": app}


def test_segmentation_mask_and_box_travel_exactly(local_server, ct):
    engine = local_server["engine"]
    c = M3DClient(local_server["url"], local_server["token"])
    c.set_volume(*ct, window="abdomen")
    engine.set_volume(*ct, window="abdomen")
    restore = force_answer(engine, " It is [SEG].")
    try:
        remote, local = c.segment("liver", sampling=SHORT), engine.segment("liver", sampling=SHORT)
    finally:
        restore()
    assert remote.mask is not None and remote.mask.dtype == np.uint8 and remote.mask.shape == ct[0].shape
    assert remote.voxel_count > 0 and np.array_equal(remote.mask, local.mask)
    assert remote.to_dict() == {**local.to_dict(), "provenance": remote.to_dict()["provenance"]}
    restore = force_answer(engine, " Coordinates are <bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end>.")
    try:
        box = c.locate("liver", sampling=SamplingOptions(max_new_tokens=40))
        local_box = engine.locate("liver", sampling=SamplingOptions(max_new_tokens=40))
    finally:
        restore()
    assert box.box == (0.1, 0.2, 0.3, 0.5, 0.6, 0.7) and isinstance(box.roi, RasRoi)
    np.testing.assert_allclose(box.roi.center, local_box.roi.center)
    np.testing.assert_allclose(box.roi.size, local_box.roi.size)
    np.testing.assert_allclose(box.roi.axes, local_box.roi.axes)
    restore = force_answer(engine, " Sorry, there is no pancreas.")
    try:
        absent = c.segment("pancreas", sampling=SamplingOptions(max_new_tokens=8))
    finally:
        restore()
    assert absent.absent and absent.mask is None


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (30, 101, 122)])
def test_mask_encoding_round_trip(shape):
    rng = np.random.default_rng(sum(shape))
    mask = (rng.random(shape) > 0.7).astype(np.uint8)
    payload = json.loads(json.dumps(encode_mask(mask)))
    assert np.array_equal(decode_mask(payload), mask)
    assert payload["encoding"] == "packbits-zlib-base64" and payload["shape"] == list(shape)


@pytest.mark.parametrize("dtype", ["uint8", "int16", ">i2", "float32", ">f8", "bool", "float16", "int64"])
def test_volume_id_matches_what_the_server_stores(local_server, ct, dtype):
    array, ijk_to_ras = ct
    sub = array[:3, :20, :10]
    sub = (sub > 0) if dtype == "bool" else sub.astype(dtype)
    c = M3DClient(local_server["url"], local_server["token"])
    remote = c.set_volume(sub, ijk_to_ras)
    stored = local_server["app"].state.m3d.store.get(remote.volume_id)
    assert stored is not None and np.array_equal(stored.array, np.asarray(sub, dtype=stored.array.dtype))
    assert stored.array.dtype.byteorder in "<|=" and np.array_equal(stored.ijk_to_ras, ijk_to_ras)


def test_sampling_fields_match_the_engine():
    from M3DAssistantLib.serving.schemas import SamplingModel

    assert set(SamplingModel.model_fields) == {f.name for f in dataclasses.fields(SamplingOptions)}


# ------------------------------------------------------------------------------------------------ TestClient
@pytest.fixture(scope="module")
def test_client(local_server):
    from fastapi.testclient import TestClient

    with TestClient(local_server["app"], base_url="http://127.0.0.1") as tc:
        tc.headers["Authorization"] = f"Bearer {local_server['token']}"
        yield tc


def test_openapi_schema_is_published_with_bearer_auth(test_client):
    schema = test_client.get("/v1/openapi.json").json()
    paths = set(schema["paths"])
    assert {"/v1/health", "/v1/info", "/v1/volumes", "/v1/volumes/{volume_id}", "/v1/cancel", "/v1/retrieve",
            "/v1/volumes/{volume_id}/retrieve"} <= paths
    assert {f"/v1/volumes/{{volume_id}}/{t}" for t in TASK_ROUTES} <= paths
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert all("422" not in op["responses"] for item in schema["paths"].values() for op in item.values())
    assert test_client.get("/docs").status_code == 404  # no pages that load scripts from a CDN


def test_quick_error_paths(test_client):
    assert test_client.post("/v1/cancel", json={"request_id": "nobody"}).json() == {"cancelled": []}
    assert test_client.post("/v1/cancel").json() == {"cancelled": []}
    r = test_client.post("/v1/cancel", json={"request_id": "x" * 65})
    assert r.status_code == 400 and "request_id" in r.json()["detail"]
    r = test_client.post(f"/v1/volumes/{'0' * 32}/report", headers={"X-M3D-Request-Id": "bad id!"})
    assert r.status_code == 400 and "X-M3D-Request-Id" in r.json()["detail"]
    r = test_client.put("/v1/health")
    assert r.status_code == 405
    r = test_client.post("/v1/volumes", content=b"", headers={"Content-Length": "lots"})
    assert r.status_code == 400


def test_a_cancel_that_overtakes_its_request(local_server, ct, test_client):
    """A client that times out cancels by id; if the cancel arrives first, the request is refused when it comes."""
    vid = M3DClient(local_server["url"], local_server["token"]).set_volume(*ct).volume_id
    assert test_client.post("/v1/cancel", json={"request_id": "early-1"}).json() == {"cancelled": []}
    r = test_client.post(f"/v1/volumes/{vid}/report", headers={"X-M3D-Request-Id": "early-1"})
    assert r.status_code == 409 and "before the request reached" in r.json()["detail"]
    assert test_client.post(f"/v1/volumes/{vid}/report", headers={"X-M3D-Request-Id": "early-1"}).status_code == 200


def test_streamed_errors_after_the_start_are_error_events(local_server, ct, test_client):
    c = M3DClient(local_server["url"], local_server["token"])
    remote = c.set_volume(*ct)
    engine = local_server["engine"]
    original = engine.report

    def broken(**kwargs):
        raise InputError("the report template is missing (test)")

    engine.report = broken
    try:
        with test_client.stream("POST", f"/v1/volumes/{remote.volume_id}/report?stream=true", json={}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
            text = "".join(r.iter_text())
    finally:
        engine.report = original
    assert text.startswith("event: error\ndata: ")
    error = json.loads(text.split("data: ", 1)[1])
    assert error == {"status": 400, "error": "InputError", "detail": "the report template is missing (test)"}
    with pytest.raises(InputError, match="template is missing"):
        engine.report = broken
        try:
            c.report(on_text=lambda t: None)
        finally:
            engine.report = original


# ----------------------------------------------------------------------------------------------- schema fuzzing
def test_openapi_fuzz_no_server_errors(local_server, ct):
    """Bounded schemathesis run (positive and negative data) on loopback: no answer is a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    c = M3DClient(local_server["url"], local_server["token"])
    known = c.set_volume(*ct).volume_id
    import urllib.request

    request = urllib.request.Request(local_server["url"] + "/v1/openapi.json",
                                     headers={"Authorization": f"Bearer {local_server['token']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = json.load(response)
    # The self-check runs the model 15 to 60 times per call: it has its own tests (test_wiring_selfcheck.py).
    raw["paths"].pop("/v1/selfcheck")
    # Half the generated ids name the uploaded CT, so the task routes also run the model (8 tokens at most).
    for item in raw["paths"].values():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "volume_id":  # (deleting the CT would leave nothing to run on)
                    parameter["schema"] = {"type": "string", "enum": [known, "0" * 32] if method != "delete"
                                           else ["0" * 32]}
    raw["components"]["schemas"]["RetrieveVolumesRequest"]["properties"]["volume_ids"]["items"] = {
        "type": "string", "enum": [known, "0" * 32]}
    schema = schemathesis.openapi.from_dict(raw)
    auth = {"Authorization": f"Bearer {local_server['token']}"}
    failures, statuses = [], collections.Counter()
    started = time.monotonic()
    for result in schema.get_all_operations():
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _fuzz(result.ok(), mode, local_server["url"], auth, failures, statuses)
    assert not failures, failures
    assert sum(statuses.values()) > 100 and time.monotonic() - started < 60
    ran_the_model = sum(n for (label, code), n in statuses.items() if code == 200 and "{volume_id}/" in label)
    assert ran_the_model >= 10, statuses  # the fuzz reached the model, not only the validation


def _fuzz(operation, mode, url, auth, failures, statuses):
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=12, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(base_url=url, headers=auth, timeout=30)
        statuses[(operation.label, response.status_code)] += 1
        if response.status_code >= 500:
            failures.append((operation.label, mode.value, response.status_code, response.text[:300]))

    check()
