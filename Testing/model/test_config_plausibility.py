"""Absurd sizes in config.json and hostile safetensors headers are refused before any model is built or any tensor
is read (model/plausibility.py, checkpoint_files.py, checkpoint_reader.py): one-line errors naming the field (or
tensor), its value and what is plausible -- from load_model, parse_lamed_config and ``m3d inspect`` alike."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from M3DAssistantLib.errors import CheckpointError, ConfigError
from M3DAssistantLib.model import load_model
from M3DAssistantLib.model import random_checkpoint as rc
from M3DAssistantLib.model.configuration_lamed import parse_lamed_config
from M3DAssistantLib.model.modeling_clip import M3DCLIPConfig

GiB = 1 << 30

ABSURD = [  # field, value, what the message names
    ("num_hidden_layers", 100000, r"num_hidden_layers=100000 is not plausible; expected an integer from 1 to 1,024"),
    ("num_attention_heads", 0, r"num_attention_heads=0 is not plausible; expected an integer from 1 to 1,024"),
    ("hidden_size", -64, r"hidden_size=-64 is not plausible; expected an integer from 1 to 65,536"),
    ("intermediate_size", 10**9, r"intermediate_size=1000000000 .* from 1 to 262,144"),
    ("intermediate_size", 1e9, r"intermediate_size=1000000000\.0 is not plausible"),
    ("vocab_size", "32000", r"vocab_size='32000' is not plausible; expected an integer"),
    ("num_key_value_heads", 3, r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("hidden_size", 66, r"hidden_size=66 is not divisible by num_attention_heads=4"),
    ("head_dim", 7, r"head width is 7 .* need an even width"),
    ("vision_num_heads", 0, r"vision_num_heads=0 is not plausible"),
    ("mm_hidden_size", 0, r"mm_hidden_size=0 is not plausible"),
    ("seg_num_layers", True, r"seg_num_layers=True is not plausible"),
    ("image_size", [32, 256, -256], r"image_size\[2\]=-256 is not plausible"),
    ("image_size", [4096, 4096, 4096], r"makes 67,108,864 patches per image; at most 1,048,576"),
    ("patch_size", "4,16,16", r"patch_size='4,16,16' is not plausible; expected 3 whole numbers"),
    ("max_position_embeddings", None, r"max_position_embeddings=None is not plausible"),
]


def _tiny_raw(family: str = "phi3") -> dict:
    return rc.official_config(family, llm=rc.TINY_LLM, multimodal=rc.TINY_MULTIMODAL, vocab_size=1015,
                              seg_token_id=1014, eos_token_id=1000, pad_token_id=1000)


def _copy(folder: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("field,value,message", ABSURD, ids=[f"{f}={v!r}" for f, v, _ in ABSURD])
def test_absurd_config_sizes_are_refused_before_building(tiny_phi3, tmp_path, field, value, message):
    """case: implausible config.json (100000 layers, 0 heads, negative or 1e9 sizes, heads that do not divide)
    -> ConfigError in one line naming the field, the value and the plausible range, before any model is built"""
    with pytest.raises(ConfigError, match=message) as caught:
        parse_lamed_config({**_tiny_raw(), field: value}, source="config.json")
    assert "\n" not in str(caught.value)
    folder = _copy(tiny_phi3, tmp_path)
    _edit_config(folder, **{field: value})
    start = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        load_model(folder, device="cpu", dtype="float32")
    assert time.monotonic() - start < 30  # refused from the file, not after a 100000-layer build (was > 100 s)


@pytest.mark.parametrize("field,value", [("num_attention_heads", 0), ("hidden_size", -64), ("vision_num_heads", 0)])
def test_inspect_reports_an_absurd_config_in_one_line(tiny_phi3, tmp_path, field, value):
    """case: implausible config.json (m3d inspect) -> 'will load NO' and one problem line naming the field; no
    traceback"""
    folder = _copy(tiny_phi3, tmp_path)
    _edit_config(folder, **{field: value})
    result = subprocess.run([sys.executable, "-m", "M3DAssistantLib", "inspect", str(folder)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith("  problem:")]
    assert len(problems) == 1 and f"{field}={value} is not plausible" in problems[0], result.stdout


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_real_model_sizes_are_plausible(family):
    """The bounds are generous: the released models' configs, and one far larger (a 405B-class Llama with a 128k
    vocabulary and a million-token context), pass."""
    parse_lamed_config(rc.official_config(family, vocab_size=32015, seg_token_id=32014, eos_token_id=32000,
                                          pad_token_id=32000))
    big = {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
           "num_key_value_heads": 8, "max_position_embeddings": 1 << 20}
    parse_lamed_config(rc.official_config(family, llm=big, vocab_size=128256, seg_token_id=128255,
                                          eos_token_id=128001, pad_token_id=128001))


def test_inspect_reports_an_absurd_clip_config(tiny_clip, tmp_path):
    from M3DAssistantLib.model.inspection import inspect_checkpoint

    folder = _copy(tiny_clip, tmp_path)
    _edit_config(folder, num_heads=0)
    report = inspect_checkpoint(folder)
    assert not report["will_load"] and any("num_heads=0 is not plausible" in p for p in report["problems"])


def test_absurd_clip_config_is_refused():
    """case: implausible M3D-CLIP config.json (0 or 10^7 layers, a BERT with 0 heads) -> ConfigError naming the
    field and the range"""
    from official_configs import OFFICIAL_CONFIG_JSON

    for change, message in [({"num_layers": 10**7}, r"num_layers=10000000 is not plausible"),
                            ({"img_size": [32, 256, 0]}, r"img_size\[2\]=0 is not plausible"),
                            ({"text_config": {"num_attention_heads": 0}}, r"\(text_config\): num_attention_heads=0")]:
        with pytest.raises(ConfigError, match=message):
            M3DCLIPConfig.from_dict({**OFFICIAL_CONFIG_JSON, **change})


# ------------------------------------------------------------------------------------------- safetensors headers
def _read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _write_safetensors(path: Path, header: dict, data: bytes, extra_bytes: int = 0) -> None:
    """A safetensors file with this header; ``extra_bytes`` more of data as a sparse hole (no disk space used)."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
        f.truncate(8 + len(raw) + len(data) + extra_bytes)


@pytest.fixture
def read_spy(monkeypatch):
    """The names of the tensors the loader reads from safetensors files."""
    from M3DAssistantLib.model import checkpoint_reader

    names: list[str] = []
    real = checkpoint_reader._read_safetensors_tensor

    def spy(f, info, dtype, scratch):
        names.append(info.name)
        return real(f, info, dtype, scratch)

    monkeypatch.setattr(checkpoint_reader, "_read_safetensors_tensor", spy)
    return names


def test_an_unexpected_8gib_tensor_is_refused_by_name_before_reading(tiny_phi3, tmp_path, read_spy):
    """case: a safetensors file holding an unexpected 8 GiB tensor -> CheckpointError naming it before any tensor is
    read or allocated (was: allocated, then 'try bfloat16')"""
    folder = _copy(tiny_phi3, tmp_path)
    path = folder / "model.safetensors"
    header, data = _read_header(path)
    header["model.stowaway.weight"] = {"dtype": "F32", "shape": [32768, 65536],
                                       "data_offsets": [len(data), len(data) + 8 * GiB]}
    _write_safetensors(path, header, data, extra_bytes=8 * GiB)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e\.g\. model\.stowaway\.weight\)"):
        load_model(folder, device="cpu", dtype="float32")
    assert read_spy == []  # refused from the header: nothing read, nothing allocated


def test_a_wrong_shape_is_refused_before_reading(tiny_phi3, tmp_path, read_spy):
    """A tensor whose shape disagrees with config.json is named before anything is read."""
    folder = _copy(tiny_phi3, tmp_path)
    path = folder / "model.safetensors"
    header, data = _read_header(path)
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    header[name]["shape"] = header[name]["shape"][::-1]
    if header[name]["shape"] == header[name]["shape"][::-1]:
        pytest.skip("square tensor")
    _write_safetensors(path, header, data)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape .* but the model .* expects"):
        load_model(folder, device="cpu", dtype="float32")
    assert read_spy == []


def _hostile_entries(header: dict) -> dict[str, dict]:
    first = next(k for k in header if k != "__metadata__")
    entry = header[first]
    begin, end = entry["data_offsets"]
    return {
        "negative dimension": {**entry, "shape": [-1, *entry["shape"][1:]] if len(entry["shape"]) > 1 else [-1]},
        "float dimension": {**entry, "shape": [float(s) for s in entry["shape"]]},
        "string offsets": {**entry, "data_offsets": [str(begin), str(end)]},
        "rank 9": {**entry, "shape": [1] * 8 + [int(end - begin) // 4], "dtype": "F32"},
        "overlap": None,  # filled below: a second tensor over the first one's bytes
    }


@pytest.mark.parametrize("case", ["negative dimension", "float dimension", "string offsets", "rank 9", "overlap",
                                  "unknown dtype"])
def test_hostile_safetensors_headers_are_refused(tiny_phi3, tmp_path, case):
    """case: a safetensors header with negative, fractional or string sizes, rank > 8, overlapping tensors or an
    unknown dtype -> CheckpointError naming the file (load_model) and a problem line (m3d inspect)"""
    folder = _copy(tiny_phi3, tmp_path)
    path = folder / "model.safetensors"
    header, data = _read_header(path)
    names = [k for k in header if k != "__metadata__"]
    if case == "overlap":
        header[names[1]] = {**header[names[1]], "data_offsets": header[names[0]]["data_offsets"],
                            "dtype": header[names[0]]["dtype"], "shape": header[names[0]]["shape"]}
    elif case == "unknown dtype":
        header[names[0]] = {**header[names[0]], "dtype": "F128"}
    else:
        header[names[0]] = _hostile_entries(header)[case]
    _write_safetensors(path, header, data)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*corrupted"):
        load_model(folder, device="cpu", dtype="float32")
    result = subprocess.run([sys.executable, "-m", "M3DAssistantLib", "inspect", str(folder)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "model.safetensors" in result.stdout and "corrupted" in result.stdout, result.stdout
