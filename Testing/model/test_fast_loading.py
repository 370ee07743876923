"""The fast loading paths give exactly the checkpoint's tensors: mapped copy-on-write where the dtype is kept (and a
write to a weight never reaches the file), read and converted where it changes, staged straight to the device (its
byte plumbing runs on the CPU here; on a GPU the cuda-marked test compares a CUDA load with a CPU load)."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from M3DAssistantLib.errors import CheckpointError
from M3DAssistantLib.model.checkpoint_files import read_safetensors_header, weight_files
from M3DAssistantLib.model.checkpoint_reader import _DeviceStaging, _read_safetensors_tensor


def _stored(folder):
    state = {}
    for path in weight_files(folder):
        state.update(load_file(str(path)))
    return state


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"], ids=["mapped", "converted"])
def test_cpu_load_gives_the_checkpoint_tensors(tiny_llama, dtype):
    from M3DAssistantLib.model import load_model

    model, _ = load_model(tiny_llama, device="cpu", dtype=dtype)
    stored = _stored(tiny_llama)
    state = model.state_dict()
    for name, tensor in stored.items():
        expected = tensor.to(getattr(torch, dtype)) if tensor.is_floating_point() else tensor
        assert torch.equal(state[name], expected), name


def test_writing_a_mapped_weight_never_changes_the_file(tiny_phi3, tmp_path):
    from M3DAssistantLib.model import load_model

    folder = shutil.copytree(tiny_phi3, tmp_path / "ckpt")
    files = weight_files(folder)
    before = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    model, _ = load_model(folder, device="cpu", dtype="float32")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # in place, as an optimizer or a LoRA merge does
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == before
    again, _ = load_model(folder, device="cpu", dtype="float32")
    first = next(iter(_stored(folder)))
    assert torch.equal(again.state_dict()[first], _stored(folder)[first])
    assert torch.equal(model.state_dict()[first], again.state_dict()[first] + 1)


def test_a_truncated_shard_is_a_clear_error(tiny_phi3, tmp_path):
    from M3DAssistantLib.model import load_model

    folder = shutil.copytree(tiny_phi3, tmp_path / "ckpt")
    shard = weight_files(folder)[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated|download"):
        load_model(folder, device="cpu", dtype="float32")


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
