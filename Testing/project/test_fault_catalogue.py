"""Fault and bad-input catalogue: the cases of issue 7 that no other test module covers yet.

Every test's docstring starts with ``case: <what goes wrong> -> <what the user gets>``;
``Utilities/fault_catalogue.py`` collects those lines (from every ``Testing/<layer>/test_*.py``) into the README table.
Each test asserts a clear error (naming the problem and the fix) or the documented handling, and that nothing the user
owns (volume, node, segment, file, checkpoint) was changed or lost.

A case whose handling is missing is an ``xfail(strict=True)`` with the fix in its reason: the table shows it as open,
and the test fails (XPASS) once the fix lands, so the marker cannot outlive the bug.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_paths import REPO

from M3DAssistantLib.engine import InferenceEngine
from M3DAssistantLib.errors import CheckpointError, ConfigError, GeometryError, InputError, M3DError
from M3DAssistantLib.geometry import RasRoi, parse_box
from M3DAssistantLib.results import BoxResult, Provenance, SamplingOptions, SegmentationResult, TextResult

SHORT = SamplingOptions(max_new_tokens=4)
NOT_UTF8 = b"is the \xff\xfe liver enlarged?".decode("utf-8", "surrogateescape")  # what argv/file reads give
UTF8_FIX = ("prompts._clean should reject strings that do not encode as UTF-8 (lone surrogates from undecodable "
            "bytes) with InputError('... is not valid UTF-8 text; re-save it as UTF-8'); today the tokenizer raises "
            "TypeError")


@contextlib.contextmanager
def model_generate_raises(engine, error: BaseException):
    """The model's generate raises ``error`` (an instance attribute, removed afterwards)."""
    def generate(*args, **kwargs):
        raise error

    engine.model.generate = generate
    try:
        yield
    finally:
        engine.model.__dict__.pop("generate", None)


def _snapshot(array: np.ndarray) -> bytes:
    return zlib.crc32(np.ascontiguousarray(array).tobytes()).to_bytes(4, "little")


# ================================================================================================= engine: prompts
PROMPT_TASKS = {
    "ask": lambda e, p: e.ask(p, sampling=SHORT),
    "choose": lambda e, p: e.choose(p, ["Axial", "Coronal"], sampling=SHORT),
    "locate": lambda e, p: e.locate(p, sampling=SHORT),
    "segment": lambda e, p: e.segment(p, sampling=SHORT),
    "segment_expression": lambda e, p: e.segment_expression(p, sampling=SHORT),
}


@pytest.mark.parametrize("task", sorted(PROMPT_TASKS))
def test_empty_prompt_engine(engine, ct, task):
    """case: empty prompt (engine, every prompted task) -> InputError 'is empty; type a question or a target name',
    the model is not run"""
    before = _snapshot(ct[0])
    with pytest.raises(InputError, match="is empty; type a question or a target name"):
        PROMPT_TASKS[task](engine, "")
    assert engine.counters["generate"] == 0 and _snapshot(ct[0]) == before


@pytest.mark.parametrize("task", sorted(PROMPT_TASKS))
def test_whitespace_prompt_engine(engine, task):
    """case: whitespace-only prompt (engine) -> InputError 'is empty', the model is not run"""
    with pytest.raises(InputError, match="is empty"):
        PROMPT_TASKS[task](engine, " \t\n \u00a0 ")
    assert engine.counters["generate"] == 0


@pytest.mark.parametrize("task", sorted(PROMPT_TASKS))
def test_100kb_prompt_engine(engine, task):
    """case: 100 kB prompt (engine) -> InputError naming its length, the 512-token limit and 'Shorten it', before
    tokenising"""
    with pytest.raises(InputError, match=r"100000 characters long; the model reads at most 512 tokens.*Shorten it"):
        PROMPT_TASKS[task](engine, "x" * 100_000)
    assert engine.counters["generate"] == 0


def test_prompt_longer_than_context_engine(engine):
    """case: prompt longer than the 512-token context but under the character limit (engine) -> InputError with the
    token count and 'shorten the question'"""
    with pytest.raises(InputError, match=r"prompt is \d+ tokens long .* at most 512; shorten the question"):
        engine.ask("word " * 1500, sampling=SHORT)
    assert engine.counters["generate"] == 0
    engine.ask("Is the liver enlarged?", sampling=SHORT)  # the engine is still usable


def test_bytes_prompt_engine(engine):
    """case: prompt given as bytes, not text (engine) -> InputError 'must be text, got bytes'"""
    with pytest.raises(InputError, match="must be text, got bytes"):
        engine.ask(b"is the liver enlarged?")


def test_non_utf8_prompt_engine(engine):
    """case: non-UTF-8 prompt (undecodable bytes from a file or argv) (engine) -> InputError naming UTF-8"""
    with pytest.raises(InputError, match="UTF-8"):
        engine.ask(NOT_UTF8, sampling=SHORT)


@pytest.mark.parametrize("choices,message", [
    ([], "between 2 and 8"), (["Liver"], "between 2 and 8"), (["Liver", " liver "], "duplicates: Liver, liver"),
    (["A", "B", ""], "choice 3 is empty"), ("Axial", "must be a list of option texts"),
    ([f"option {i}" for i in range(9)], "between 2 and 8")])
def test_bad_choices_engine(engine, choices, message):
    """case: choices empty / one / duplicates / blank / a string / more than 8 (engine) -> InputError naming the
    rule (2 to 8 distinct options)"""
    with pytest.raises(InputError, match=message):
        engine.choose("Which organ?", choices, sampling=SHORT)
    assert engine.counters["generate"] == 0


# ================================================================================================ boxes and ROIs
@pytest.mark.parametrize("text,message", [
    ("[0.1, 0.2]", "expected 6 comma-separated numbers"), ("[a, b, c, d, e, f]", "'a' is not a number"),
    ("", "expected 6 comma-separated numbers"), ("[0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8]", "expected 6"),
    ("[0.1, 0.2, 0.3, 1.5, 0.6, 0.7]", r"must lie in \[0, 1\]"), ("[-0.1, 0.2, 0.3, 0.5, 0.6, 0.7]", r"\[0, 1\]"),
    ("[0.5, 0.2, 0.3, 0.1, 0.6, 0.7]", "inverted along d: the first three numbers are the minimum corner"),
    ("[nan, 0.2, 0.3, 0.5, 0.6, 0.7]", "NaN or Inf")])
def test_box_text_malformed_out_of_range_inverted(text, message):
    """case: box text malformed / out of range / inverted / NaN -> GeometryError with the expected form
    ([d1, h1, w1, d2, h2, w2] in 0..1, min corner first)"""
    with pytest.raises(GeometryError, match=message):
        parse_box(text)


@pytest.mark.parametrize("answer", [" <bx_start>[0.5, 0.2, 0.3, 0.1, 0.6, 0.7]<bx_end>",
                                    " <bx_start>[0.1, 0.2, 0.3, 1.5, 0.6, 0.7]<bx_end>",
                                    " <bx_start>[0.1, 0.2<bx_end>"])
def test_model_answers_a_bad_box(engine, answer):
    """case: the model answers an inverted / out-of-range / cut-off box -> BoxResult with parse_error and the raw
    text, no box and no ROI made up"""
    from forcing import force_answer

    restore = force_answer(engine, answer)
    try:
        result = engine.locate("liver", sampling=SamplingOptions(max_new_tokens=40))
    finally:
        restore()
    assert result.box is None and result.roi is None and result.parse_error
    assert "[" in result.text


def test_roi_outside_the_volume(engine, ct):
    """case: ROI outside the volume (describe region, crop) -> GeometryError 'lies outside ... move the ROI inside
    the volume' / 'contains no voxel ... move the ROI onto the volume'"""
    far = RasRoi(center=np.array([5000.0, 5000.0, 5000.0]), size=np.array([10.0, 10.0, 10.0]))
    with pytest.raises(GeometryError, match="lies outside the region the model sees.*move the ROI inside"):
        engine.describe_region(far, sampling=SHORT)
    engine.set_volume(*ct, window="abdomen", roi=far)
    with pytest.raises(GeometryError, match="contains no voxel of the volume.*move the ROI onto the volume"):
        engine.report(sampling=SHORT)
    assert engine.counters["generate"] == 0


# ================================================================================================= engine: volumes
_RNG = np.random.default_rng(7)
_GOOD = _RNG.normal(size=(12, 20, 24)).astype(np.float32)
BAD_VOLUMES = {  # name -> (array, message the user gets)
    "2D image": (_GOOD[0], "single 2D image .* needs a 3D volume"),
    "4D (time series)": (_GOOD[None].repeat(2, 0), "4D \\(time series\\) or vector/RGB volume select one"),
    "vector (RGB)": (np.stack([_GOOD] * 3, -1), "4D \\(time series\\) or vector/RGB volume select one"),
    "single slice": (_GOOD[:1], "a single slice is not a 3D volume; load the whole series"),
    "no voxels": (_GOOD[:0], "it has no voxels"),
    "complex": (_GOOD.astype(np.complex64), "complex64 is not a real scalar; convert it"),
    "not an array": ("CT", "must be a 3D array .* got str"),
}


@pytest.mark.parametrize("name", sorted(BAD_VOLUMES))
def test_bad_volume_shapes_and_types_engine(engine, ct, name):
    """case: volume 2D / 4D / vector / single slice / empty / complex / not an array (engine) -> InputError naming
    the shape or type and what to select; the current volume stays set"""
    array, message = BAD_VOLUMES[name]
    before = engine._current
    with pytest.raises(InputError, match=message):
        engine.set_volume(array, np.eye(4))
    assert engine._current == before and engine.counters["generate"] == 0


def _with_nan(array: np.ndarray) -> np.ndarray:
    out = array.astype(np.float32)
    out[5, 10, 10:14] = np.nan
    out[6, 0, 0] = np.inf
    return out


@pytest.mark.parametrize("name,make,window,message", [
    ("NaN/Inf", _with_nan, "abdomen", "has 5 NaN/Inf voxels .* numpy.nan_to_num"),
    ("constant", lambda a: np.full_like(a, -1000), None, "is constant: every voxel is -1000"),
    ("label map", lambda a: (a > 100).astype(np.uint8) * 3, None, "if this is a label map or mask, select the image"),
])
def test_nan_constant_and_label_map_volumes_engine(engine, ct, name, make, window, message):
    """case: volume with NaN/Inf voxels / constant / a label map (engine) -> InputError naming the count or the
    value and the fix (nan_to_num, check the selection, select the image volume), the model is not run; the array is
    not modified"""
    array = make(ct[0])
    before = _snapshot(array)
    engine.set_volume(array, ct[1], window=window)
    with pytest.raises(InputError, match=message):
        engine.report(sampling=SHORT)
    assert engine.counters["generate"] == 0 and _snapshot(array) == before


@pytest.mark.slow
def test_2gb_volume_engine(tiny_phi3_model):
    """case: 2 GiB volume (1024 x 1024 x 1024 int16) (engine) -> answered; the volume is neither copied nor
    modified (under 1/8 of its size in extra array memory), the box comes back in its space"""
    import tracemalloc

    from forcing import force_answer

    array = np.full((1024, 1024, 1024), -1000, np.int16)
    array[100:900, 200:800, 200:800] = 40
    array[300:600, 300:600, 250:500] = 60
    ijk_to_ras = np.diag([-0.5, -0.5, 0.8, 1.0])
    ijk_to_ras[:3, 3] = (255.0, 255.0, -400.0)
    before = zlib.crc32(array[::7, ::7, ::7].tobytes())
    engine = InferenceEngine(tiny_phi3_model)
    tracemalloc.start()
    try:
        engine.set_volume(array, ijk_to_ras, window="abdomen")
        restore = force_answer(engine, " <bx_start>[0.1, 0.2, 0.3, 0.6, 0.7, 0.8]<bx_end>")
        try:
            result = engine.locate("liver", sampling=SamplingOptions(max_new_tokens=40))
        finally:
            restore()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < array.nbytes / 8, \
        f"{peak / 2**20:.0f} MiB of arrays allocated for a {array.nbytes / 2**30} GiB volume"
    assert zlib.crc32(array[::7, ::7, ::7].tobytes()) == before
    assert result.box is not None and result.roi is not None
    lo, hi = result.roi.center - result.roi.size / 2, result.roi.center + result.roi.size / 2
    bounds = np.array([ijk_to_ras @ np.array([i, j, k, 1.0]) for i in (0, 1023) for j in (0, 1023) for k in (0, 1023)])
    assert np.all(lo >= bounds.min(0)[:3] - 1) and np.all(hi <= bounds.max(0)[:3] + 1)


# =========================================================================================== model folder faults
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_model_folder_missing(tmp_path):
    """case: model folder missing -> CheckpointError 'no such folder. Pass an existing checkpoint folder, or a
    Hugging Face hub id'"""
    from M3DAssistantLib.model import load_model

    with pytest.raises(CheckpointError, match="no such folder. Pass an existing checkpoint folder, or a Hugging"):
        load_model(tmp_path / "not-there", device="cpu", dtype="float32")


@pytest.mark.parametrize("removed,error,message", [
    ("config.json", ConfigError, "config.json: not found. A checkpoint folder must contain config.json"),
    ("model.safetensors", CheckpointError, "no weights found .* Point to a complete M3D checkpoint folder"),
    ("tokenizer.model", CheckpointError, "tokenizer"),
])
def test_model_folder_partial(tiny_phi3, tmp_path, removed, error, message):
    """case: model folder partial (no config / no weights / no tokenizer) -> CheckpointError or ConfigError naming
    the missing file and asking for a complete folder; the folder is not modified"""
    from M3DAssistantLib.model import load_model

    folder = _copy(tiny_phi3, tmp_path / "partial")
    (folder / removed).unlink()
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    with pytest.raises(error, match=message):
        load_model(folder, device="cpu", dtype="float32")
    assert sorted((p.name, p.stat().st_size) for p in folder.iterdir()) == before


# =================================================================================================== out of memory
def _cuda_oom() -> BaseException:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return oom_type("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)")


@pytest.mark.parametrize("error", [_cuda_oom(), RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 8589934592 bytes")])
def test_out_of_memory_helper_names_what_to_change(error):
    """case: out of GPU memory (CUDA, MPS or CPU allocator error) -> oom.OutOfMemoryError naming dtype, device and a
    smaller model"""
    from M3DAssistantLib.oom import OutOfMemoryError, translate_out_of_memory

    with pytest.raises(OutOfMemoryError) as info:
        with translate_out_of_memory("cuda:0", torch.float32, "GoodBaiBai88/M3D-LaMed-Llama-2-7B", "the report"):
            raise error
    message = str(info.value)
    assert "out of GPU memory on cuda:0 while the report" in message
    assert "--dtype bfloat16" in message and "--device" in message and "M3D-LaMed-Phi-3-4B" in message
    assert isinstance(info.value, M3DError) and info.value.__cause__ is error


def test_out_of_memory_helper_leaves_other_errors_alone():
    """case: an error that is not out-of-memory inside the OOM guard -> re-raised unchanged"""
    from M3DAssistantLib.oom import is_out_of_memory, translate_out_of_memory

    with pytest.raises(ValueError, match="unrelated"):
        with translate_out_of_memory("cpu", torch.bfloat16):
            raise ValueError("unrelated")
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and is_out_of_memory(_cuda_oom())


def test_out_of_memory_on_cpu_in_bf16_suggests_what_applies():
    """case: out of RAM on the CPU in bfloat16 with the small model -> advice without the dtype and model switches
    that would not help"""
    from M3DAssistantLib.oom import out_of_memory_message

    message = out_of_memory_message("cpu", torch.bfloat16, "GoodBaiBai88/M3D-LaMed-Phi-3-4B", "loading the model")
    assert message.startswith("out of memory (RAM) on cpu while loading the model")
    assert "--dtype" not in message and "smaller model" not in message and "--device cuda" in message


def test_out_of_memory_in_the_engine(engine):
    """case: out of GPU memory during a request (engine, simulated) -> M3DError naming dtype, device and a smaller
    model"""
    with model_generate_raises(engine, _cuda_oom()):
        with pytest.raises(M3DError, match="dtype"):
            engine.report(sampling=SHORT)


# ===================================================================================================== server
@pytest.fixture(scope="module")
def app_client(tiny_phi3_model, ct):
    """The server app in this process (fastapi TestClient: no socket) with the CT uploaded."""
    from fastapi.testclient import TestClient

    from M3DAssistantLib.serving.server import create_app

    engine = InferenceEngine(tiny_phi3_model)
    app = create_app(engine, "catalogue-token-0123456789", max_queue=2, max_new_tokens=16,
                     max_volume_bytes=4 << 20)
    # raise_server_exceptions=False: a 500 is seen as a real client sees it, not re-raised into the test
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as tc:
        tc.headers["Authorization"] = "Bearer catalogue-token-0123456789"
        array, ijk_to_ras = ct
        small = np.ascontiguousarray(array[::2, ::4, ::4]).astype(np.int16)
        r = tc.post("/v1/volumes", content=zlib.compress(small.tobytes()), headers={
            "Content-Type": "application/octet-stream", "X-M3D-Shape": ",".join(map(str, small.shape)),
            "X-M3D-Dtype": "int16", "X-M3D-Compression": "zlib",
            "X-M3D-IJK-To-RAS": ",".join(repr(float(v)) for v in ijk_to_ras.ravel())})
        assert r.status_code in (200, 201), r.text
        yield {"tc": tc, "vid": r.json()["volume_id"], "engine": engine, "app": app}


def _stored_volumes(app_client) -> set:
    store = app_client["app"].state.m3d.store
    return {app_client["vid"]} if store.get(app_client["vid"]) is not None else set()


@pytest.mark.parametrize("question,message", [("", "empty"), ("   \n\t ", "empty"), ("x" * 100_000, "100000|at most"),
                                              ("word " * 1500, "512")])
def test_bad_prompts_server(app_client, question, message):
    """case: empty / whitespace / 100 kB / over-context prompt (server) -> 400 InputError with the engine's message;
    the uploaded volume stays"""
    tc, vid = app_client["tc"], app_client["vid"]
    r = tc.post(f"/v1/volumes/{vid}/ask", json={"question": question, "sampling": {"max_new_tokens": 4}})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "InputError" and __import__("re").search(message, body["detail"]), body
    assert _stored_volumes(app_client) == {vid}


def test_non_utf8_body_server(app_client):
    """case: request body that is not UTF-8 (server) -> 400 InputError, not a 500"""
    tc, vid = app_client["tc"], app_client["vid"]
    body = b'{"question": "is the \xff\xfe liver enlarged?"}'
    r = tc.post(f"/v1/volumes/{vid}/ask", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "InputError" and _stored_volumes(app_client) == {vid}


def test_lone_surrogate_prompt_server(app_client):
    """case: JSON prompt with an escaped lone surrogate ("\\udcff", valid JSON, not encodable text) (server) ->
    400 InputError, not a 500"""
    tc, vid = app_client["tc"], app_client["vid"]
    r = tc.post(f"/v1/volumes/{vid}/ask", content=b'{"question": "liver \\udcff?", "sampling": {"max_new_tokens": 4}}',
                headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "InputError", r.text
    assert _stored_volumes(app_client) == {vid}


@pytest.mark.parametrize("choices,message", [([], "between 2 and 8"), (["Liver", "liver"], "duplicates")])
def test_bad_choices_server(app_client, choices, message):
    """case: choices empty / with duplicates (server) -> 400 InputError naming the rule"""
    tc, vid = app_client["tc"], app_client["vid"]
    r = tc.post(f"/v1/volumes/{vid}/choose", json={"question": "Which organ?", "choices": choices})
    assert r.status_code == 400 and message in r.json()["detail"], r.text


@pytest.mark.parametrize("region,message", [
    ({"center": [5000, 5000, 5000], "size": [10, 10, 10]}, "outside"),
    ({"center": [0, 0, 0], "size": [-10, 10, 10]}, "size"),
])
def test_bad_region_server(app_client, region, message):
    """case: ROI outside the volume / negative size (server describe_region) -> 400 naming the ROI problem"""
    tc, vid = app_client["tc"], app_client["vid"]
    r = tc.post(f"/v1/volumes/{vid}/describe_region", json={"region": region, "sampling": {"max_new_tokens": 4}})
    assert r.status_code == 400 and message in r.json()["detail"].lower(), r.text
    assert _stored_volumes(app_client) == {vid}


def test_out_of_memory_server(app_client):
    """case: out of GPU memory during a request (server, simulated) -> an error whose detail names dtype, device and
    a smaller model; the server keeps serving"""
    tc, vid, engine = app_client["tc"], app_client["vid"], app_client["engine"]
    with model_generate_raises(engine, _cuda_oom()):
        r = tc.post(f"/v1/volumes/{vid}/report", json={"sampling": {"max_new_tokens": 4}})
    assert tc.post(f"/v1/volumes/{vid}/report", json={"sampling": {"max_new_tokens": 4}}).status_code == 200
    assert "dtype" in r.json()["detail"], r.text


# ============================================================================================ session (Slicer)
class BlockingBackend:
    """An engine stand-in whose answers wait for ``release`` (a request 'in flight') or raise ``error``."""

    def __init__(self, result, error: BaseException | None = None):
        self.result, self.error = result, error
        self.release = threading.Event()
        self.started = threading.Event()
        self.volumes = 0

    def set_volume(self, array_kji, ijk_to_ras, *, window=None, roi=None, display_window=None, modality=None):
        self.volumes += 1

    def set_display(self, display_window=None, modality=None):
        pass

    def _answer(self, *args, **kwargs):
        self.started.set()
        assert self.release.wait(30)
        if self.error is not None:
            raise self.error
        return self.result

    report = locate = segment = segment_expression = _answer

    def cancel(self):
        self.release.set()


def _provenance(task):
    return Provenance(task=task, model="fake", model_revision=None, dtype="float32", device="cpu", prompt="")


def _nodes(scene_) -> dict:
    return {cls: scene_.GetNumberOfNodesByClass(cls) for cls in
            ("vtkMRMLSegmentationNode", "vtkMRMLMarkupsROINode", "vtkMRMLTextNode", "vtkMRMLScalarVolumeNode")}


@pytest.mark.slicer
@pytest.mark.parametrize("task", ["segment", "locate", "report"])
def test_volume_deleted_while_a_request_runs(headless_slicer, data_dir, task):
    """case: volume node deleted while a request runs (session) -> InputError naming the volume when the result is
    collected; no node or segment is created"""
    from M3DAssistantLib.session import AssistantSession

    scene_, logics = headless_slicer
    volume = logics["volumes"].AddArchetypeVolume(str(data_dir / "example_ct_sm.nii.gz"), "ct")
    shape = tuple(reversed(volume.GetImageData().GetDimensions()))
    mask = np.zeros(shape, np.uint8)
    mask[5:10, 20:40, 20:40] = 1
    results = {"segment": SegmentationResult(" [SEG]", "liver", mask, _provenance("seg")),
               "locate": BoxResult(" [0.1, 0.1, 0.1, 0.5, 0.5, 0.5]", "liver", (0.1, 0.1, 0.1, 0.5, 0.5, 0.5),
                                   RasRoi(np.zeros(3), np.ones(3) * 10), _provenance("rec")),
               "report": TextResult("A report.", _provenance("report"))}
    backend = BlockingBackend(results[task])
    session = AssistantSession(backend)
    pending = getattr(session, task)(volume, "liver", wait=False) if task != "report" else \
        session.report(volume, wait=False)
    assert backend.started.wait(30)
    scene_.RemoveNode(volume)
    before = _nodes(scene_)
    backend.release.set()
    assert pending.wait(30)
    with pytest.raises(InputError, match="ct"):
        pending.result()
    assert _nodes(scene_) == before


@pytest.mark.slicer
@pytest.mark.parametrize("task", ["segment", "locate", "report"])
def test_worker_killed_mid_answer_session(headless_slicer, data_dir, task):
    """case: worker killed mid-answer (session) -> the worker's error is raised, no half-written node or segment,
    the next request sends the volume again"""
    from M3DAssistantLib.session import AssistantSession
    from M3DAssistantLib.worker import WorkerCrashedError

    scene_, logics = headless_slicer
    volume = logics["volumes"].AddArchetypeVolume(str(data_dir / "example_ct_sm.nii.gz"), "ct")
    segmentation = scene_.AddNewNodeByClass("vtkMRMLSegmentationNode", "user segmentation")
    segmentation.GetSegmentation().AddEmptySegment("user segment")
    backend = BlockingBackend(None, WorkerCrashedError("the M3D worker stopped: killed by SIGKILL"))
    session = AssistantSession(backend)
    before = _nodes(scene_)
    if task == "segment":
        pending = session.segment(volume, "liver", segmentation, wait=False)
    elif task == "locate":
        pending = session.locate(volume, "liver", wait=False)
    else:
        pending = session.report(volume, wait=False)
    assert backend.started.wait(30)
    backend.release.set()
    assert pending.wait(30)
    with pytest.raises(WorkerCrashedError, match="SIGKILL"):
        pending.result()
    assert _nodes(scene_) == before
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    backend.error, backend.result = None, TextResult("A report.", _provenance("report"))
    backend.release.set()
    session.report(volume)
    assert backend.volumes == 2  # sent again: a restarted worker has lost it


# ========================================================================================== training checkpoints
class _DiskFullAccelerator:
    """accelerate.Accelerator's checkpoint surface, single process; ``save_state`` writes half a file then fails."""

    is_main_process = True
    distributed_type = "NO"

    def __init__(self, fail: bool):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir, safe_serialization=True, **kwargs):
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"\0" * 1024)
        if self.fail:
            (out / "optimizer.bin").write_bytes(b"\0" * 100)  # half written
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "optimizer.bin"))
        (out / "optimizer.bin").write_bytes(b"\1" * 2048)


def test_disk_full_while_writing_a_checkpoint(tmp_path):
    """case: disk full while writing a training checkpoint -> OSError ENOSPC raised; the previous checkpoint is intact
    and is the one resume picks; the half-written one is never listed"""
    pytest.importorskip("accelerate")
    from M3DTrainingLib import train
    from M3DTrainingLib.config import CHECKPOINTS_DIR

    out = tmp_path / "run"
    good = train._save_checkpoint(_DiskFullAccelerator(False), out, 10, keep=2)
    files = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(OSError) as info:
        train._save_checkpoint(_DiskFullAccelerator(True), out, 20, keep=2)
    assert info.value.errno == errno.ENOSPC and "No space left" in str(info.value)
    assert train.list_checkpoints(out) == [good] and train.latest_checkpoint(out) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == files
    assert not (out / CHECKPOINTS_DIR / "step-0000020").exists()
    again = train._save_checkpoint(_DiskFullAccelerator(False), out, 20, keep=2)  # space freed: the retry works
    assert train.list_checkpoints(out) == [good, again]


# ================================================================================================ the catalogue
def test_readme_catalogue_is_current():
    """The README's fault table is what Utilities/fault_catalogue.py renders from the tests (run it to update)."""
    result = subprocess.run([sys.executable, str(REPO / "Utilities" / "fault_catalogue.py"), "--check"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
