"""Loading straight to the device: the staged reader gives the same tensors as the CPU reader (its byte plumbing runs
on the CPU here; on a GPU the cuda-marked test compares a CUDA load with a CPU load)."""

from __future__ import annotations

import pytest
import torch

from M3DAssistantLib.model.checkpoint_files import read_safetensors_header, weight_files
from M3DAssistantLib.model.checkpoint_reader import _DeviceStaging, _read_safetensors_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["same-dtype", "converted"])
def test_staged_reads_equal_plain_reads(tiny_llama, dtype):
    """Two alternating staging buffers, tensors of every size, a dtype change: byte for byte the plain reader."""
    for path in weight_files(tiny_llama):
        infos = read_safetensors_header(path)
        largest = max(i.nbytes for i in infos)
        staging = _DeviceStaging(torch.device("cpu"), largest)
        scratch = torch.empty(largest, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            staged = [staging.read(f.fileno(), info, dtype) for info in infos]
            plain = [_read_safetensors_tensor(f.fileno(), info, dtype, scratch) for info in infos]
        staging.close()
        for info, a, b in zip(infos, staged, plain):
            assert a.dtype == dtype and a.shape == b.shape, info.name
            assert torch.equal(a, b), info.name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_load_equals_cpu_load(tiny_phi3, dtype):
    from M3DAssistantLib.model import load_model

    on_gpu, _ = load_model(tiny_phi3, device="cuda", dtype=dtype)
    on_cpu, _ = load_model(tiny_phi3, device="cpu", dtype=dtype)
    gpu_state, cpu_state = on_gpu.state_dict(), on_cpu.state_dict()
    assert gpu_state.keys() == cpu_state.keys()
    for name, tensor in gpu_state.items():
        assert tensor.device.type == "cuda", name
        assert torch.equal(tensor.cpu(), cpu_state[name]), name
