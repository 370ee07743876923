"""The installation check from Slicer: the sample CT packaged with the module, ``POST /v1/selfcheck`` in the worker
(the model it has loaded), ``M3DClient.selfcheck``, the backends, ``AssistantSession.check_installation`` and
``Logic.checkInstallation`` -- the same report as ``run_selfcheck`` in process, with progress and cancel, and the
user's volume untouched afterwards."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import threading

import pytest
from repo_paths import REPO
from serving import serve_in_thread, wait_for

from M3DAssistantLib import selfcheck
from M3DAssistantLib.errors import CancelledError
from M3DAssistantLib.results import SamplingOptions
from M3DAssistantLib.settings import MemorySettings

TOKEN = "selfcheck-test-token"
LIVER = ["liver"]


def test_the_sample_is_packaged_with_the_module(data_dir):
    """The self-check's CT, labels and label names ship under the module's Resources (listed in its CMakeLists.txt,
    which Slicer packages), byte for byte the test data whose checksums Testing/Data lists."""
    assert selfcheck.SAMPLE_DIR == REPO / "M3DAssistant" / "Resources" / "SampleData" / "TotalSegmentator"
    sums = dict(line.split()[::-1] for line in (data_dir / "SHA256SUMS").read_text().splitlines() if line.strip())
    cmake = (REPO / "M3DAssistant" / "CMakeLists.txt").read_text()
    for path in (selfcheck.SAMPLE_CT, selfcheck.SAMPLE_LABELS, selfcheck.SAMPLE_LABEL_NAMES):
        assert path.read_bytes() == (data_dir / path.name).read_bytes()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[path.name]
        assert f"Resources/SampleData/TotalSegmentator/{path.name}" in cmake
    assert "Apache" in (selfcheck.SAMPLE_DIR / "LICENSE").read_text()


def test_report_round_trips_through_json(tiny_phi3_model):
    from M3DAssistantLib.engine import InferenceEngine

    report = selfcheck.run_selfcheck(InferenceEngine(tiny_phi3_model), structures=selfcheck.structures_named(LIVER),
                                     max_new_tokens=3)
    assert report.volume["path"] == str(selfcheck.SAMPLE_CT)  # the packaged sample is the default
    again = selfcheck.SelfCheckReport.from_dict(report.to_dict())
    assert again.to_dict() == report.to_dict()
    with pytest.raises(selfcheck.InputError, match="not a self-check report"):
        selfcheck.SelfCheckReport.from_dict({"schema": "something else"})
    with pytest.raises(selfcheck.InputError, match="update m3d-slicer"):
        selfcheck.SelfCheckReport.from_dict(dict(report.to_dict(), version=selfcheck.SCHEMA_VERSION + 1))
    assert [s.name for s in selfcheck.structures_named(["liver", "pancreas"])] == ["liver", "pancreas"]
    assert selfcheck.structures_named(["liver"])[0].labels == ("liver",)
    assert selfcheck.structures_named(None) == selfcheck.DEFAULT_STRUCTURES


@pytest.fixture(scope="module")
def server(tiny_phi3_model):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.serving.app import create_app

    engine = InferenceEngine(tiny_phi3_model)
    with serve_in_thread(create_app(engine, TOKEN)) as (url, _port):
        yield {"url": url, "engine": engine}


def test_selfcheck_in_the_server_equals_the_one_in_process(server, tiny_phi3_model, ct):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.serving.client import M3DClient

    client = M3DClient(server["url"], TOKEN, timeout=300)
    client.set_volume(*ct, window="abdomen")
    before = client.report(sampling=SamplingOptions(max_new_tokens=5))
    events = []
    remote = client.selfcheck(structures=["liver", "left kidney"], max_new_tokens=4, on_progress=events.append)
    local = selfcheck.run_selfcheck(InferenceEngine(tiny_phi3_model), max_new_tokens=4,
                                    structures=selfcheck.structures_named(["liver", "left kidney"]))
    assert isinstance(remote, selfcheck.SelfCheckReport)
    strip = ("created",)
    assert {k: v for k, v in remote.to_dict().items() if k not in strip} == \
        {k: v for k, v in local.to_dict().items() if k not in strip}
    steps = [e.fraction for e in events if e.stage == "selfcheck"]
    assert len(steps) == 2 * 2 + 3 + 1 and steps == sorted(steps) and steps[-1] == 1.0
    plain = client.selfcheck(structures=LIVER, max_new_tokens=2)  # not streamed
    assert plain.verdict in ("pass", "inconclusive", "orientation suspect", "poor") and len(plain.checks) == 5
    # the check set its own volumes in the engine; the client's volume is still the one it asks about
    after = client.report(sampling=SamplingOptions(max_new_tokens=5))
    assert (after.text, after.provenance.intensity) == (before.text, before.provenance.intensity)


def test_the_selfcheck_route_needs_the_token_and_checks_its_body(server):
    import http.client
    import json
    import urllib.parse

    netloc = urllib.parse.urlsplit(server["url"]).netloc

    def post(body, token=TOKEN):
        conn = http.client.HTTPConnection(netloc, timeout=60)
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
        conn.request("POST", "/v1/selfcheck", body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    assert post({}, token=None)[0] == 401 and post({}, token="wrong")[0] == 401
    status, answer = post({"conventions": "some"})
    assert status == 400 and "conventions" in answer["detail"]
    status, answer = post({"max_new_tokens": 0})
    assert status == 400 and "max_new_tokens" in answer["detail"]
    status, answer = post({"structures": ["liver", "unicorn horn"], "max_new_tokens": 2})
    assert status == 400 and answer["error"] == "InputError" and "unicorn horn" in answer["detail"]  # no such label
    status, answer = post({"structures": ["liver"], "max_new_tokens": 2})
    assert status == 200 and answer["schema"] == "m3d-selfcheck" and len(answer["checks"]) == 5


def test_a_running_selfcheck_is_cancelled(server):
    from M3DAssistantLib.serving.client import M3DClient

    client = M3DClient(server["url"], TOKEN, timeout=300)
    started, outcome = threading.Event(), {}

    def run():
        try:
            outcome["report"] = client.selfcheck(max_new_tokens=64, on_progress=lambda event: started.set())
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(60)
    client.cancel()
    thread.join(60)
    assert isinstance(outcome.get("error"), CancelledError), outcome


def test_session_and_backend_run_the_check_and_resend_only_the_volume_id(server, headless_slicer, ct_path):
    from M3DAssistantLib.backends import ClientBackend
    from M3DAssistantLib.serving.client import M3DClient
    from M3DAssistantLib.session import AssistantSession

    _scene, logics = headless_slicer
    node = logics["volumes"].AddArchetypeVolume(str(ct_path), "CT")
    client = M3DClient(server["url"], TOKEN, timeout=300)
    uploads = []
    upload = client.upload_volume
    client.upload_volume = lambda *args: uploads.append(1) or upload(*args)
    events = []
    session = AssistantSession(ClientBackend(client, on_progress=events.append),
                               sampling=SamplingOptions(max_new_tokens=2))
    session.report(node)
    pending = session.check_installation(structures=LIVER, max_new_tokens=2, wait=False)
    assert pending.wait(300)
    report = pending.result()
    assert isinstance(report, selfcheck.SelfCheckReport) and report.conventions == "default"
    assert any(e.stage == "selfcheck" for e in events)
    _, result = session.report(node)  # the volume is set again: by its id, the voxels are not uploaded again
    assert result.text is not None and session.volume_uploads == 2 and len(uploads) <= 1


def test_session_runs_the_check_on_an_in_process_engine(tiny_phi3_model, headless_slicer, ct_path):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.session import AssistantSession

    _scene, logics = headless_slicer
    node = logics["volumes"].AddArchetypeVolume(str(ct_path), "CT")
    engine = InferenceEngine(tiny_phi3_model)
    session = AssistantSession(engine, sampling=SamplingOptions(max_new_tokens=2))
    _, first = session.report(node)
    events = []
    report = session.check_installation(structures=LIVER, max_new_tokens=2, on_progress=events.append)
    assert len(report.checks) == 5 and events[-1].fraction == 1.0
    _, again = session.report(node)  # the engine's current volume was the sample: the session sends its own again
    assert again.text == first.text and session.volume_uploads == 2


def test_logic_check_installation_on_a_server(assistant, server):  # noqa: F811 (a fixture)
    """The console API and what the panel's button calls: a report, also as lastSelfCheck; wait=False returns a
    request; progress reaches the Logic's progress callback."""
    from M3DAssistantLib.backends import ClientBackend
    from M3DAssistantLib.serving.client import M3DClient

    logic = assistant.M3DAssistantLogic(settings=MemorySettings(),
                                        backendFactory=lambda config: ClientBackend(M3DClient(server["url"], TOKEN,
                                                                                              timeout=300)))
    events = []
    logic.progressCallback = events.append
    report = logic.checkInstallation(structures=LIVER, maxNewTokens=2)
    assert report is logic.lastSelfCheck and isinstance(report, selfcheck.SelfCheckReport)
    assert [c.task for c in report.checks] == ["segment", "locate", "plane", "plane", "plane"]
    assert any(e.stage == "selfcheck" for e in events)
    request = logic.checkInstallation(structures=LIVER, maxNewTokens=2, wait=False)
    wait_for(request.done, timeout=300)
    assert request.result().verdict == report.verdict
    with pytest.raises(ValueError, match="'default' or 'all'"):
        logic.checkInstallation(conventions="some")
    logic.shutdown()


def test_logic_check_installation_in_a_real_local_worker(assistant, tiny_phi3):  # noqa: F811 (a fixture)
    """The whole path the button takes on this computer: the worker process is started, runs the check on the
    packaged sample and answers; Slicer's process never loads the model."""
    settings = MemorySettings({"pythonExecutable": sys.executable})
    logic = assistant.M3DAssistantLogic(settings=settings)
    p = logic.getParameterNode()
    p.modelChoice, p.modelSource, p.runOn = assistant.MODEL_FOLDER, str(tiny_phi3), assistant.RUN_CPU
    try:
        report = logic.checkInstallation(structures=LIVER, maxNewTokens=2)
        assert report.model["source"] == str(tiny_phi3) and report.volume["path"] == str(selfcheck.SAMPLE_CT)
        assert logic.workerProcess().pid is not None
    finally:
        logic.shutdown()


def test_what_slicer_imports_for_the_check_and_the_preview_stays_light():
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO / "M3DAssistant")!r}]
        import M3DAssistantLib.selfcheck, M3DAssistantLib.serving.client, M3DAssistantLib.scene
        import M3DAssistantLib.panel, M3DAssistantLib.session, M3DAssistantLib.backends
        heavy = sorted(m for m in ("torch", "transformers", "fastapi", "SimpleITK") if m in sys.modules)
        assert not heavy, heavy
        print("light")
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "light" in result.stdout, result.stdout + result.stderr
