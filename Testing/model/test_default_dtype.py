"""The default dtype: bf16 on CUDA, fp32 on the CPU (measured faster there at the official size, even with native
bf16: benchmarks/decode_bound.py) and on Apple MPS; an explicit dtype always wins."""

from __future__ import annotations

import pytest
import torch

from M3DAssistantLib.errors import ConfigError
from M3DAssistantLib.model import loading


def test_default_per_device_and_explicit_choices():
    cpu = torch.device("cpu")
    assert loading.parse_dtype(None, cpu) == torch.float32
    assert loading.parse_dtype("auto", cpu) == torch.float32
    assert loading.parse_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert loading.parse_dtype(None, torch.device("mps")) == torch.float32
    assert loading.parse_dtype("float32", cpu) == torch.float32 and loading.parse_dtype("bf16", cpu) == torch.bfloat16
    assert loading.parse_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ConfigError, match="unknown dtype"):
        loading.parse_dtype("int8", cpu)


def test_an_engine_without_a_dtype_loads_the_cpu_default(tiny_phi3):
    from M3DAssistantLib.engine import InferenceEngine

    assert InferenceEngine(tiny_phi3, device="cpu").info()["dtype"] == "float32"
