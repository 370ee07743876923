"""Confidence, evidence maps, refinement, measurements and the REC box over the wire: the JSON form round trip, the
server's request models, and the client against an in-process server (remote result = local result)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")

from forcing import force_answer, forced_answer  # noqa: E402
from serving import serve_in_thread  # noqa: E402

from M3DAssistantLib.errors import InputError  # noqa: E402
from M3DAssistantLib.results import AnalysisOptions, SamplingOptions  # noqa: E402
from M3DAssistantLib.serving.client import M3DClient  # noqa: E402
from M3DAssistantLib.serving.protocol import (  # noqa: E402
    decode_map,
    encode_map,
    result_from_dict,
    result_payload,
)

SHORT = SamplingOptions(max_new_tokens=8)
EVERYTHING = AnalysisOptions(evidence=True, evidence_steps=1, refine=True, locate=True)
BOX_ANSWER = " Coordinates are <bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end>."


@pytest.fixture(scope="module")
def server(tiny_phi3_model):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.serving.server import create_app

    engine = InferenceEngine(tiny_phi3_model)
    token = "analysis-test-token-0123456789"
    app = create_app(engine, token, max_queue=4, max_new_tokens=40, max_volume_bytes=4 << 20)
    with serve_in_thread(app) as (url, _port):
        yield {"url": url, "token": token, "engine": engine, "app": app}


def assert_same_analysis(remote, local):
    """Remote and local results agree on every analysis field (the evidence map to float16 precision)."""
    assert remote.confidence == local.confidence
    if local.evidence is None:
        assert remote.evidence is None
        return
    np.testing.assert_allclose(remote.evidence.model_values, local.evidence.model_values,
                               atol=1e-3 * local.evidence.scale)
    np.testing.assert_allclose(remote.evidence.on_volume(), local.evidence.on_volume(), atol=2e-3)
    assert remote.evidence.mapping == local.evidence.mapping and remote.evidence.ranges == local.evidence.ranges
    for key in ("method", "steps", "answer_logprob", "baseline_logprob", "attribution_sum", "model_shape"):
        assert remote.evidence.to_dict()[key] == local.evidence.to_dict()[key], key
    assert remote.evidence.scale == pytest.approx(local.evidence.scale, rel=1e-3)


def test_a_segmentation_with_everything_travels_exactly(server, ct):
    """Refined mask, its box, measurements, mask and token confidence, the REC box and its agreement, and the
    evidence map: what the client rebuilds is what the engine made."""
    engine = server["engine"]
    client = M3DClient(server["url"], server["token"])
    client.set_volume(*ct, window="abdomen")
    engine.set_volume(*ct, window="abdomen")
    restore = force_answer(engine, " It is [SEG].")
    try:
        remote = client.segment("liver", sampling=SHORT, analysis=EVERYTHING)
        local = engine.segment("liver", sampling=SHORT, analysis=EVERYTHING)
    finally:
        restore()
    assert remote.voxel_count > 0 and np.array_equal(remote.mask, local.mask)
    assert remote.refinement.mapping == local.refinement.mapping
    assert remote.refinement.to_dict() == local.refinement.to_dict()
    assert remote.measurements == local.measurements and remote.box == local.box
    np.testing.assert_allclose(remote.roi.center, local.roi.center)
    assert remote.located.text == local.located.text and remote.located_iou == local.located_iou
    assert remote.confidence.mask == local.confidence.mask
    assert_same_analysis(remote, local)
    assert remote.provenance.analysis == EVERYTHING.to_dict()


def test_choice_and_box_confidence_travel(server, ct):
    engine = server["engine"]
    client = M3DClient(server["url"], server["token"])
    client.set_volume(*ct, window="abdomen")
    engine.set_volume(*ct, window="abdomen")
    with forced_answer(engine, " A. Liver"):
        remote = client.choose("Which organ?", ["Liver", "Lung", "Bone"], sampling=SHORT)
        local = engine.choose("Which organ?", ["Liver", "Lung", "Bone"], sampling=SHORT)
    assert remote.confidence.choices == local.confidence.choices and remote.probability == local.probability
    with forced_answer(engine, BOX_ANSWER):
        box = client.locate("liver", sampling=SamplingOptions(max_new_tokens=40),
                            analysis=AnalysisOptions(evidence=True, evidence_steps=1))
    assert box.box == (0.1, 0.2, 0.3, 0.5, 0.6, 0.7) and box.evidence is not None
    assert [t.text for t in box.confidence.tokens][:1] == [box.confidence.tokens[0].text]
    plain = client.ask("What?", sampling=SHORT, analysis=AnalysisOptions(confidence=False))
    assert plain.confidence is None and plain.evidence is None


def test_streamed_evidence_reports_its_progress(server, ct):
    client = M3DClient(server["url"], server["token"])
    client.set_volume(*ct, window="abdomen")
    stages, chunks = [], []
    result = client.report(sampling=SHORT, analysis=AnalysisOptions(evidence=True, evidence_steps=2),
                           on_text=chunks.append, on_progress=lambda event: stages.append(event.stage))
    assert "evidence" in stages and "".join(chunks) == result.text
    assert result.evidence.steps == 2


def test_options_a_task_does_not_take_are_refused_before_sending(server, ct):
    client = M3DClient(server["url"], server["token"])
    client.set_volume(*ct)
    with pytest.raises(InputError, match="does not take the option"):
        client.report(analysis=AnalysisOptions(refine=True))


def test_the_request_models_check_the_options(server, ct):
    """case: an analysis option the task does not take (refine on a report) or evidence_steps outside 1..64 in a
    server request -> HTTP 400 naming the field; an empty analysis object is the plain task"""
    from fastapi.testclient import TestClient

    client = M3DClient(server["url"], server["token"])
    volume = client.set_volume(*ct).volume_id
    with TestClient(server["app"], base_url="http://127.0.0.1") as http:
        http.headers["Authorization"] = f"Bearer {server['token']}"
        bad = http.post(f"/v1/volumes/{volume}/report", json={"analysis": {"refine": True}})
        assert bad.status_code == 400 and "refine" in bad.json()["detail"]
        bad = http.post(f"/v1/volumes/{volume}/segment", json={"target": "liver",
                                                                "analysis": {"evidence_steps": 0}})
        assert bad.status_code == 400 and "evidence_steps" in bad.json()["detail"]
        ok = http.post(f"/v1/volumes/{volume}/ask", json={"question": "Why?", "analysis": {},
                                                           "sampling": {"max_new_tokens": 2}})
        assert ok.status_code == 200 and ok.json()["provenance"]["analysis"] == AnalysisOptions().to_dict()
        schema = http.get("/v1/openapi.json").json()["components"]["schemas"]
        assert set(schema["SegmentationAnalysis"]["properties"]) == {"confidence", "evidence", "evidence_steps",
                                                                     "refine", "locate"}
        assert schema["Analysis"]["properties"]["evidence_steps"]["maximum"] == 64


def test_payload_round_trip_in_process(engine):
    """result_payload -> JSON -> result_from_dict for every kind with analysis parts, without a server."""
    for forced, method, args in ((" It is [SEG].", "segment", ("liver",)), (BOX_ANSWER, "locate", ("liver",)),
                                 (" B. Lung", "choose", ("Which?", ["Liver", "Lung"]))):
        analysis = EVERYTHING if method == "segment" else AnalysisOptions(evidence=True, evidence_steps=1)
        with forced_answer(engine, forced):
            local = getattr(engine, method)(*args, sampling=SamplingOptions(max_new_tokens=40), analysis=analysis)
        remote = result_from_dict(json.loads(json.dumps(result_payload(local, "v" * 32))))
        assert type(remote) is type(local) and remote.text == local.text
        assert_same_analysis(remote, local)


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 9, 7), (32, 64, 64)])
def test_map_encoding_round_trip(shape):
    values = np.random.default_rng(0).normal(0, 1e-4, shape).astype(np.float32)
    scale = float(np.abs(values).max())
    payload = json.loads(json.dumps(encode_map(values, scale)))
    assert payload["encoding"] == "float16-zlib-base64" and payload["shape"] == list(shape)
    np.testing.assert_allclose(decode_map(payload), values, atol=1e-3 * scale)
    with pytest.raises(Exception, match="encoding"):
        decode_map({**payload, "encoding": "png"})
