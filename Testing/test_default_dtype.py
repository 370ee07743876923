"""The default dtype: bf16 on CUDA and on CPUs that compute bf16 natively (measured faster there:
benchmarks/decode_bound.py), fp32 on other CPUs; an explicit dtype always wins."""

from __future__ import annotations

import pytest
import torch

from M3DAssistantLib.errors import ConfigError
from M3DAssistantLib.model import loading

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd asimddp\n"


@pytest.mark.parametrize(("cpuinfo", "native"), [(SAPPHIRE_RAPIDS, True), (SKYLAKE, False), (GRAVITON3, True),
                                                 (GRAVITON2, False), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert loading.cpu_has_native_bf16(cpuinfo) is native


@pytest.mark.parametrize("native", [True, False])
def test_default_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert loading.parse_dtype(None, cpu) == (torch.bfloat16 if native else torch.float32)
    assert loading.parse_dtype("auto", cpu) == loading.parse_dtype(None, cpu)
    assert loading.parse_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert loading.parse_dtype(None, torch.device("mps")) == torch.float32
    assert loading.parse_dtype("float32", cpu) == torch.float32 and loading.parse_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype"):
        loading.parse_dtype("int8", cpu)


def test_an_engine_without_a_dtype_loads_the_default(monkeypatch, tiny_phi3):
    from M3DAssistantLib.engine import InferenceEngine

    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda native=native: native)
        assert InferenceEngine(tiny_phi3, device="cpu").info()["dtype"] == expected
