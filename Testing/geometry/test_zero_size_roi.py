"""A zero-size ROI for describe-region, also one whose size is zero in all but name (1e-300 mm): refused by RasRoi
itself, so the engine, the server and the Slicer session give the same GeometryError before the model runs."""

from __future__ import annotations

import numpy as np
import pytest

from M3DAssistantLib.errors import GeometryError
from M3DAssistantLib.geometry import MIN_ROI_SIZE_MM, RasRoi
from M3DAssistantLib.results import SamplingOptions

SHORT = SamplingOptions(max_new_tokens=3)
TINY_SIZES = [(1e-300, 1e-300, 1e-300), (10.0, 10.0, 1e-300), (1e-9, 5.0, 5.0), (0.0, 5.0, 5.0), (-1e-300, 5, 5)]


def _centre(ct) -> np.ndarray:
    array, ijk_to_ras = ct
    return (ijk_to_ras @ np.array([array.shape[2] / 2, array.shape[1] / 2, array.shape[0] / 2, 1.0]))[:3]


@pytest.mark.parametrize("size", TINY_SIZES)
def test_zero_size_roi_is_refused_engine(engine, ct, size):
    """case: zero-size ROI, also 1e-300 mm (describe region, engine) -> GeometryError 'zero or negative size ... at
    least 0.001 mm', the model is not run"""
    with pytest.raises(GeometryError, match=r"zero or negative size .* at least 0\.001 mm"):
        engine.describe_region(RasRoi(_centre(ct), size), sampling=SHORT)
    assert engine.counters["generate"] == 0


def test_the_smallest_roi_taken_is_a_micrometre(engine, ct):
    """The bound is far below any voxel: an ROI thinner than a voxel is still asked about (as the nearest voxel)."""
    assert MIN_ROI_SIZE_MM == 1e-3
    result = engine.describe_region(RasRoi(_centre(ct), (MIN_ROI_SIZE_MM,) * 3), sampling=SHORT)
    assert "<bx_start>" in result.provenance.prompt


@pytest.mark.parametrize("size", [[1e-300, 1e-300, 1e-300], [20, 20, 1e-12]])
def test_zero_size_roi_is_refused_server(tiny_phi3_model, size):
    """case: zero-size ROI, also 1e-300 mm (server describe_region) -> 400 GeometryError naming the size"""
    from fastapi.testclient import TestClient

    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.serving.server import create_app

    engine = InferenceEngine(tiny_phi3_model)
    array = np.random.default_rng(0).normal(0, 100, (8, 16, 16)).astype(np.int16)
    with TestClient(create_app(engine, "roi-token-0123456789abcdef"), base_url="http://127.0.0.1") as tc:
        tc.headers["Authorization"] = "Bearer roi-token-0123456789abcdef"
        r = tc.post("/v1/volumes", content=array.tobytes(), headers={
            "Content-Type": "application/octet-stream", "X-M3D-Shape": "8,16,16", "X-M3D-Dtype": "int16",
            "X-M3D-Compression": "none", "X-M3D-IJK-To-RAS": ",".join(map(str, np.eye(4).ravel()))})
        assert r.status_code == 201, r.text
        vid = r.json()["volume_id"]
        r = tc.post(f"/v1/volumes/{vid}/describe_region",
                    json={"region": {"center": [8, 8, 4], "size": size}, "sampling": {"max_new_tokens": 3}})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "GeometryError" and "zero or negative size" in r.json()["detail"]
    assert engine.counters["generate"] == 0
