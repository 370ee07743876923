"""Shared pytest fixtures: test data paths, headless Slicer (slicer-core), tiny official-layout checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from repo_paths import DATA

DATA_DIR = DATA / "totalsegmentator"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def ct_path() -> Path:
    return DATA_DIR / "example_ct_sm.nii.gz"


@pytest.fixture(scope="session")
def labels_total() -> dict[int, str]:
    return {int(k): v for k, v in json.loads((DATA_DIR / "labels_total.json").read_text()).items()}


def make_headless_slicer():
    """Scene + module logics from slicer-core (M3DAssistantLib.scene.headless_slicer); skips without slicer-core."""
    pytest.importorskip("slicer")
    from M3DAssistantLib.scene import headless_slicer

    scene, logics = headless_slicer()
    return scene, logics, logics.pop("_keepalive")


@pytest.fixture
def headless_slicer():
    """A fresh headless MRML scene with the module logics: (scene, logics)."""
    scene, logics, keepalive = make_headless_slicer()
    yield scene, logics
    del keepalive


# ------------------------------------------------------------------------------------------ tiny checkpoints
# Written once per session by our official-layout writer; tests that modify a checkpoint copy it first.


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    from M3DAssistantLib.model import random_checkpoint as rc

    return rc.write_random_lamed_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "phi3", "phi3", llm=rc.TINY_LLM, multimodal=rc.TINY_MULTIMODAL
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama variant, sharded safetensors with an index (as the 7B repo)."""
    from M3DAssistantLib.model import random_checkpoint as rc

    return rc.write_random_lamed_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "llama", "llama", llm=rc.TINY_LLM, multimodal=rc.TINY_MULTIMODAL,
        max_shard_bytes=400_000, seed=1,
    )


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    from M3DAssistantLib.model import random_checkpoint as rc

    return rc.write_random_clip_checkpoint(tmp_path_factory.mktemp("ckpt") / "clip", tiny=True)


@pytest.fixture(scope="session")
def tiny_phi3_model(tiny_phi3):
    from M3DAssistantLib.model import load_model

    return load_model(tiny_phi3, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def ct(data_dir):
    """The real test CT as (array K,J,I, IJK->RAS) via our reader."""
    from M3DAssistantLib.volume_io import read_volume

    return read_volume(data_dir / "example_ct_sm.nii.gz")


@pytest.fixture
def engine(tiny_phi3_model, ct):
    """An InferenceEngine on the tiny checkpoint with the real CT set (abdomen window); forced answers undone."""
    from M3DAssistantLib.engine import InferenceEngine

    eng = InferenceEngine(tiny_phi3_model)
    eng.set_volume(*ct, window="abdomen")
    yield eng
    eng.model.__dict__.pop("generate", None)


# ------------------------------------------------------------------------------------------ the panels on real Qt


@pytest.fixture
def slicer_harness(tmp_path):
    """Our modules under a Slicer-like application on real Qt widgets (``Testing/helpers/slicer_harness``): a fresh
    slicer-core scene, ``qt``/``ctk``/``slicer.app``/parameter-node binding as in Slicer, settings in ``tmp_path``.
    Fails the test when an exception escaped a slot or a Qt/VTK callback (remove the ones a test expects from
    ``harness.slotErrors``)."""
    pytest.importorskip("PySide6")
    pytest.importorskip("slicer")
    from slicer_harness import make_harness

    harness = make_harness(settingsFolder=str(tmp_path / "qsettings"))
    try:
        yield harness
        escaped = list(harness.slotErrors)
    finally:
        harness.uninstall()
    assert not escaped, f"exceptions escaped slots or callbacks: {escaped}"


@pytest.fixture
def assistant_panel(slicer_harness, ct_path, tiny_phi3, tiny_clip):
    """The opened M3D Assistant panel with the CT loaded, set up by the user for the tiny checkpoint on the CPU; its
    real worker starts on the first task (``panel_user.open_assistant_panel``): ``(harness, module, widget, volume)``.
    The worker is stopped after the test."""
    from panel_user import open_assistant_panel

    module, widget, volume = open_assistant_panel(slicer_harness, ct_path, tiny_phi3, tiny_clip)
    yield slicer_harness, module, widget, volume
    widget.logic.shutdown()


@pytest.fixture
def assistant(slicer_harness):
    """M3DAssistant.py imported under the test harness (``Testing/helpers/slicer_harness``: real Qt, slicer-core's
    scene, Slicer's parameter-node binding)."""
    return slicer_harness.loadModule("M3DAssistant")


# ------------------------------------------------------------------------------------------ the CLI in-process


@pytest.fixture
def forced_cli(monkeypatch, tiny_phi3_model):
    """Run cli.main in-process with an engine whose answers start with a chosen text."""
    from forcing import force_answer

    from M3DAssistantLib import cli
    from M3DAssistantLib.engine import InferenceEngine

    answers = {}

    def make_engine(args, bar):
        engine = InferenceEngine(tiny_phi3_model)
        if "text" in answers:
            answers["restore"] = force_answer(engine, answers["text"])
        return engine

    monkeypatch.setattr(cli, "_engine", make_engine)

    def run(answer, *argv):
        answers["text"] = answer
        try:
            return cli.main([str(a) for a in argv])
        finally:
            answers.pop("restore", lambda: None)()

    return run


# ------------------------------------------------------------------------------------------ module-file coverage floor
from coverage_check import pytest_addoption, pytest_runtestloop  # noqa: E402, F401  (--min-coverage-per-file)
