"""The speed benchmarks of issue 15 (cohort, decode_bound, load_time, quantization): a smoke run each in the default
suite, so the scripts cannot rot, and the cuda-marked full-size runs for a GPU box (one short call each)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from repo_paths import REPO

BENCHMARKS = REPO / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ratio(out: str) -> float:
    last = out.strip().splitlines()[-1]
    assert last.startswith("ratio: "), last
    return float(last.split()[1])


def test_cohort_smoke(capsys):
    _load("cohort").main(["--smoke", "--tokens", "6", "--volumes", "4", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert _ratio(out) > 0
    assert "outputs identical to batch size 1: 4/4 volumes" in out  # fp32 greedy: token for token
    for phase in ("resampling", "vision encoder", "prefill and other", "decoding"):
        assert out.count(phase) == 2


def test_decode_bound_smoke(capsys):
    _load("decode_bound").main(["--smoke", "--tokens", "4"])
    out = capsys.readouterr().out
    # the smoke model is tiny: per-call overhead dwarfs its bound, so the ratio may print as 0.00
    assert 0 <= _ratio(out) <= 1.5 and "better dtype here:" in out and "% of the bound" in out
    assert "float32" in out and "bfloat16" in out and "GB/s" in out


def test_load_time_smoke(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("M3D_BENCH_DIR", str(tmp_path))
    _load("load_time").main(["--smoke", "--repeats", "1"])
    out = capsys.readouterr().out
    assert _ratio(out) > 0 and "peak RSS" in out
    assert list(tmp_path.iterdir()) == []  # the written checkpoint is deleted


def test_quantization_smoke(capsys):
    _load("quantization").main(["--smoke", "--tokens", "4"])
    out = capsys.readouterr().out
    assert _ratio(out) > 0
    assert "(reference)" in out and "PyTorch int8 kernel" in out and "agreement" in out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cohort_official_size_on_a_gpu(capsys):
    """8 volumes x report at the official size (Phi-3-4B, 32 layers, bf16) on the GPU: batched vs one at a time.
    bf16 rounding differs between batch shapes, so identity is reported, not asserted."""
    _load("cohort").main(["--device", "cuda", "--layers", "32", "--dtype", "bfloat16", "--tokens", "64"])
    out = capsys.readouterr().out
    assert _ratio(out) > 0 and "outputs identical to batch size 1:" in out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_time_direct_to_gpu(capsys):
    """The official-size checkpoint loaded onto the GPU: the CPU's peak RSS stays far below the weights."""
    _load("load_time").main(["--device", "cuda", "--repeats", "1"])
    out = capsys.readouterr().out
    assert _ratio(out) > 0
    peak = float(out.split("peak RSS ")[-1].split("x")[0])
    assert peak < 0.3  # two staging buffers, not the model
