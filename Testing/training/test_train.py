"""Training (M3DTrainingLib.train, .config, .lora, .memory, .merge): the official loss, LoRA/trainable parts, presets
and memory estimates, a 20-step overfit, the merged checkpoint against base + adapter, and 2-process DDP on CPU (gloo,
accelerate launch) against one process with the doubled batch. All on the tiny official-layout checkpoint, CPU only.
Kill-and-resume and job control are in test_jobs.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from training_runs import read_events, subprocess_env, synthetic_config, train_losses  # noqa: E402


# ----------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses (OMP_NUM_THREADS=1): same kernels, same numbers, no contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process run starts from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def synthetic_batch(tokenizer, num_image_tokens: int, masks: str = "half", size: int = 4):
    from training_synthetic import SyntheticM3DDataset, collate

    dataset = SyntheticM3DDataset("", tokenizer, num_image_tokens, size=size, masks=masks)
    return collate([dataset[i] for i in range(size)])


# -------------------------------------------------------------------------------------------- the training loss
def official_dice_bce(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LaMed's BinaryDiceLoss and BCELoss (loss.py), written out: soft dice, smooth 1 in the denominator only."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 2 * (p * t).sum(1) / (p.sum(1) + t.sum(1) + 1)
    return (1 - dice).mean(), torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


def test_training_loss_is_lm_plus_dice_plus_bce_on_masked_samples_only(tiny_phi3_model):
    model, tokenizer = tiny_phi3_model
    n = model.num_image_tokens
    batch = synthetic_batch(tokenizer, n, masks="half")  # samples 0 and 2 have masks and a [SEG]
    seg_id = tokenizer.m3d_special_tokens.seg
    batch["input_ids"][1, -2] = seg_id  # a [SEG] in a sample WITHOUT mask: it must not count
    with torch.no_grad():
        loss, parts = model.training_loss(batch["images"], batch["input_ids"], batch["attention_mask"],
                                          batch["labels"], batch["segs"])
        out = model(input_ids=batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], output_hidden_states=True)
        # independent [SEG] handling: the hidden state at the position BEFORE each [SEG] token
        rows = [0, 2]
        prompts = []
        for i in rows:
            positions = (batch["input_ids"][i] == seg_id).nonzero().flatten()
            assert len(positions) == 1
            prompts.append(model.model.seg_projector(out.hidden_states[-1][i, positions[0] - 1]))
        logits = model.model.seg_module(batch["images"][rows], torch.stack(prompts))
        dice, bce = official_dice_bce(logits, batch["segs"][rows])
    torch.testing.assert_close(parts["lm"], out.loss)
    torch.testing.assert_close(parts["dice"], dice, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["bce"], bce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, out.loss + dice + bce, rtol=1e-5, atol=1e-6)

    # the mask-less sample's image and mask do not enter the segmentation terms
    changed = {k: v.clone() for k, v in batch.items() if k != "task"}
    changed["images"][1] = torch.rand_like(changed["images"][1])
    with torch.no_grad():
        _, parts_changed = model.training_loss(changed["images"], changed["input_ids"], changed["attention_mask"],
                                               changed["labels"], changed["segs"])
    torch.testing.assert_close(parts_changed["dice"], parts["dice"])
    torch.testing.assert_close(parts_changed["bce"], parts["bce"])


def test_training_loss_without_masks_is_the_lm_loss(tiny_phi3_model):
    model, tokenizer = tiny_phi3_model
    batch = synthetic_batch(tokenizer, model.num_image_tokens, masks="none")
    with torch.no_grad():
        loss, parts = model.training_loss(batch["images"], batch["input_ids"], batch["attention_mask"],
                                          batch["labels"], batch["segs"])
        plain = model(input_ids=batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss
    assert set(parts) == {"lm"}
    torch.testing.assert_close(loss, plain)


def test_segmentation_gradient_reaches_the_seg_token_state(tiny_phi3):
    """The Dice/BCE terms train the LLM through the [SEG]-predicting hidden state, and the SegVol decoder."""
    from M3DAssistantLib.model import load_model

    model, tokenizer = load_model(tiny_phi3, device="cpu", dtype="float32")
    model.requires_grad_(True)
    batch = synthetic_batch(tokenizer, model.num_image_tokens, masks="all", size=2)
    # labels=None: no LM term at all, so any LLM gradient comes from the segmentation loss
    loss, parts = model.training_loss(batch["images"], batch["input_ids"], batch["attention_mask"], None,
                                      batch["segs"])
    assert float(parts["lm"]) == 0 and float(parts["dice"]) > 0
    loss.backward()
    assert model.model.seg_module.mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0
    assert model.model.seg_projector[0].weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- config and parts
def test_config_yaml_presets_overrides_and_errors(tmp_path):
    from M3DAssistantLib.errors import ConfigError
    from M3DTrainingLib.config import OFFICIAL_PARTS, TrainConfig

    path = tmp_path / "train.yaml"
    path.write_text("preset: one 24 GB GPU\nbase_model: some/model\ndataset: data\noutput_dir: out\n"
                    "learning_rate: 1.0e-4\n")
    config = TrainConfig.from_yaml(path, ["max_steps=7"])
    assert config.preset == "one-24gb-gpu"
    assert config.gradient_checkpointing and config.mixed_precision == "bf16"
    assert config.parts == ["mm_projector", "seg_projector", "seg_decoder"]
    assert config.learning_rate == 1e-4 and config.max_steps == 7  # explicit keys win over the preset
    assert config.dataset == str(tmp_path / "data")  # relative to the YAML file
    again = TrainConfig.from_yaml(config.to_yaml(tmp_path / "again.yaml"))
    assert again == config

    official = TrainConfig.from_dict({"preset": "official", "dataset": "d", "output_dir": "o"})
    assert (official.lora_r, official.lora_alpha, official.lora_dropout) == (16, 32, 0.05)
    assert official.learning_rate == 5e-5 and official.lr_scheduler == "cosine" and official.warmup_ratio == 0.03
    assert official.parts == list(OFFICIAL_PARTS["lora"])
    stage1 = TrainConfig.from_dict({"stage": "projector", "dataset": "d", "output_dir": "o"})
    assert stage1.parts == ["mm_projector", "embed_tokens"]

    for bad, words in [({"lerning_rate": 1}, "unknown key"), ({"stage": "full"}, "stage"),
                       ({"preset": "huge"}, "preset"), ({"trainable_parts": ["eyes"]}, "trainable_parts"),
                       ({"lora_target_modules": ["lm_head"]}, "fully trained")]:
        with pytest.raises(ConfigError, match=words):
            TrainConfig.from_dict({"dataset": "d", "output_dir": "o", **bad})


def test_official_lora_targets_are_every_llm_linear_and_nothing_else(tiny_phi3_model):
    from M3DTrainingLib.lora import official_lora_targets

    model, _ = tiny_phi3_model
    targets = official_lora_targets(model)
    layers = model.config.num_hidden_layers
    expected = {f"model.layers.{i}.{m}" for i in range(layers)
                for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert set(targets) == expected


def test_prepare_model_trains_lora_and_the_chosen_parts(tiny_phi3, tmp_path):
    from M3DAssistantLib.model import load_model
    from M3DTrainingLib.lora import official_name, prepare_model

    model, _ = load_model(tiny_phi3, device="cpu", dtype="float32")
    config = synthetic_config(tiny_phi3, tmp_path / "o", preset="one-24gb-gpu", mixed_precision="no")
    module = prepare_model(config, model)
    trained = {official_name(n) for n, p in module.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trained) and any(".lora_B." in n for n in trained)
    non_lora = {n for n in trained if "lora_" not in n}
    assert non_lora and all(n.startswith(("model.mm_projector.", "model.seg_projector.",
                                          "model.seg_module.prompt_encoder.", "model.seg_module.mask_decoder."))
                            for n in non_lora)
    assert not any(n.startswith(("model.vision_tower.", "model.seg_module.image_encoder.", "lm_head",
                                 "model.embed_tokens")) for n in trained)


def test_memory_estimates_of_the_presets_at_official_size():
    from M3DAssistantLib.model.configuration_lamed import parse_lamed_config
    from M3DAssistantLib.model.random_checkpoint import official_config
    from M3DTrainingLib.config import TrainConfig
    from M3DTrainingLib.memory import estimate_memory

    lamed = parse_lamed_config(official_config("phi3", vocab_size=32015, seg_token_id=32014, eos_token_id=32000,
                                               pad_token_id=32000))
    gb = 1024**3
    official = estimate_memory(TrainConfig.from_dict({"preset": "official", "dataset": "d", "output_dir": "o"}),
                               lamed, cuda=True)
    small = estimate_memory(TrainConfig.from_dict({"preset": "one-24gb-gpu", "dataset": "d", "output_dir": "o"}),
                            lamed, cuda=True)
    assert 3.9e9 < official.total_params < 4.3e9  # Phi-3-mini + ViT + SegVol
    assert official.total_bytes > 24 * gb  # does not fit a consumer GPU
    assert small.total_bytes < 20 * gb  # fits 24 GB with room for fragmentation and longer sequences
    assert small.weights_bytes < 0.55 * official.total_params * 4  # frozen weights in bf16
    # Adam: two fp32 moments per trained parameter; gradients: one
    assert official.optimizer_bytes == 2 * official.gradients_bytes == 8 * official.trainable_params
    assert "Memory estimate" in small.format()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_phi3):
    from M3DAssistantLib.model import load_model
    from M3DTrainingLib.lora import prepare_model

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, tokenizer = load_model(tiny_phi3, device="cpu", dtype="float32")
        config = synthetic_config(tiny_phi3, Path("unused"), gradient_checkpointing=checkpointing,
                                  disable_dropout=True)
        module = prepare_model(config, model)
        batch = synthetic_batch(tokenizer, model.num_image_tokens, masks="half")
        loss, _ = module(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                         batch["segs"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


# -------------------------------------------------------------------------------------------- overfit and merge
@pytest.fixture(scope="module")
def overfit_run(tiny_phi3, tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState

    from M3DTrainingLib.train import train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    output_dir = tmp_path_factory.mktemp("overfit") / "run"
    config = synthetic_config(tiny_phi3, output_dir, save_steps=10)
    events = []
    result = train(config, progress=events.append)
    torch.set_num_threads(before)
    return config, result, events


def test_overfit_20_steps_halves_the_loss(overfit_run):
    config, result, events = overfit_run
    assert result.steps == 20 and len(result.losses) == 20
    assert result.losses[-1] <= 0.5 * result.losses[0], result.losses
    out = Path(config.output_dir)
    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "trainable.safetensors",
            "train_config.yaml"} <= {p.name for p in adapter.iterdir()}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000010"]
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (16, 32, 0.05)

    from safetensors import safe_open

    with safe_open(str(adapter / "trainable.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert {"model.mm_projector.projector.0.weight", "model.seg_module.mask_decoder.iou_token.weight"} <= names
    assert not any("lora" in n or "base_layer" in n for n in names)

    # progress: the one ProgressEvent mechanism, with metrics, to the callback and to progress.jsonl
    from M3DAssistantLib.progress import ProgressEvent

    assert all(isinstance(e, ProgressEvent) for e in events)
    stages = [e.stage for e in events]
    assert stages[0] == "estimate" and stages[1] == "start" and stages[-1] == "done" and "checkpoint" in stages
    lines = read_events(out)
    assert [e["stage"] for e in lines] == stages
    step = next(e for e in lines if e["stage"] == "train" and e["step"] == 20)
    assert step["fraction"] == 1.0 and step["total_steps"] == 20 and step["eta_s"] == 0
    assert step["lr"] == pytest.approx(1e-2) and step["samples_per_s"] > 0 and step["epoch"] == pytest.approx(20)
    assert {"loss", "lm_loss", "dice_loss", "bce_loss", "gpu_memory_bytes", "time", "message"} <= set(step)
    assert step["loss"] == pytest.approx(step["lm_loss"] + step["dice_loss"] + step["bce_loss"], rel=1e-5)


def test_one_24gb_gpu_preset_runs_end_to_end_in_bf16_with_frozen_encoders(tiny_phi3, tmp_path):
    """The consumer-GPU preset's code path (bf16 autocast and bf16 frozen weights, gradient checkpointing, LoRA +
    projector + SegVol decoder) on CPU, where no GPU is at hand."""
    from safetensors import safe_open

    from M3DTrainingLib.train import train

    config = synthetic_config(tiny_phi3, tmp_path / "run", preset="one-24gb-gpu", max_steps=3,
                              learning_rate=1e-3, dataset_kwargs={"size": 4, "masks": "half"})
    assert config.gradient_checkpointing and config.mixed_precision == "bf16"
    result = train(config)
    assert result.steps == 3 and all(0 < loss < 50 for loss in result.losses)
    estimate = read_events(tmp_path / "run")[0]
    assert estimate["stage"] == "estimate" and estimate["details"]["gradient_checkpointing"]
    assert estimate["details"]["dtype"].startswith("bf16")
    with safe_open(str(result.adapter_dir / "trainable.safetensors"), "pt") as f:
        names = set(f.keys())
        assert {f.get_tensor(n).dtype for n in names} == {torch.float32}  # trained weights kept in fp32
    assert names and all(n.startswith(("model.mm_projector.", "model.seg_projector.",
                                       "model.seg_module.prompt_encoder.", "model.seg_module.mask_decoder."))
                         for n in names)


def test_train_refuses_to_overwrite_a_finished_run(overfit_run):
    from M3DAssistantLib.errors import ConfigError
    from M3DTrainingLib.train import train

    config, _, _ = overfit_run
    with pytest.raises(ConfigError, match="finished run"):
        train(config)


def logits_for(model, tokenizer, num_image_tokens):
    batch = synthetic_batch(tokenizer, num_image_tokens, masks="half")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], images=batch["images"],
                     attention_mask=batch["attention_mask"]).logits


def test_merged_checkpoint_loads_strictly_and_equals_base_plus_adapter(overfit_run, tiny_phi3, tmp_path):
    from M3DAssistantLib.model import load_model
    from M3DAssistantLib.model.configuration_lamed import parse_lamed_config
    from M3DTrainingLib.merge import load_trained_model, merge

    config, result, _ = overfit_run
    merged_dir = merge(config.output_dir, tmp_path / "merged")
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= names
    raw = json.loads((merged_dir / "config.json").read_text())
    assert raw["model_type"] == "lamed_phi3" and raw["architectures"] == ["LamedPhi3ForCausalLM"]
    assert parse_lamed_config(raw).multimodal == parse_lamed_config(
        json.loads((tiny_phi3 / "config.json").read_text())).multimodal

    from safetensors import safe_open

    with safe_open(str(merged_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("lora" in k or "base_layer" in k or k.startswith("base_model") for k in keys)

    merged, tokenizer = load_model(merged_dir, device="cpu", dtype="float32")  # strict loader
    n = merged.num_image_tokens
    adapted, _ = load_trained_model(result.adapter_dir, device="cpu", dtype="float32")  # base + adapter, unmerged
    assert type(adapted).__name__.startswith("Peft")
    base, _ = load_model(tiny_phi3, device="cpu", dtype="float32")
    merged_logits = logits_for(merged, tokenizer, n)
    torch.testing.assert_close(merged_logits, logits_for(adapted, tokenizer, n), rtol=1e-4, atol=1e-4)
    assert (merged_logits - logits_for(base, tokenizer, n)).abs().max() > 0.1

    with pytest.raises(Exception, match="not empty"):
        merge(config.output_dir, merged_dir)


def test_cli_train_estimate_and_merge_are_registered(overfit_run, tmp_path, capsys):
    from M3DAssistantLib.cli import main

    config, _, _ = overfit_run
    yaml_path = Path(config.output_dir) / "adapter" / "train_config.yaml"
    assert main(["train", str(yaml_path), "--estimate-only", "--set", "per_device_batch_size=2"]) == 0
    assert "Memory estimate" in capsys.readouterr().out
    assert main(["merge", config.output_dir, str(tmp_path / "m"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # a lab shares model folders: nothing we write is owner-only (safetensors alone would make it so)
    umask = os.umask(0o022)
    os.umask(umask)
    written = [p for folder in (tmp_path / "m", Path(config.output_dir)) for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written)
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o666 & ~umask)}


@pytest.mark.slicer
def test_trains_on_a_dataset_exported_from_a_slicer_scene(tiny_phi3, headless_slicer, data_dir, tmp_path):
    """The real pipeline: annotated scene -> export -> M3DDataset (default factory, its own collate) -> train."""
    test_export = pytest.importorskip("test_export")
    from M3DTrainingLib.config import TrainConfig
    from M3DTrainingLib.export import export_dataset
    from M3DTrainingLib.train import train

    scene, logics = headless_slicer
    test_export.build_scene(scene, logics, data_dir)
    exported = export_dataset(scene, tmp_path / "dataset", model_shape=test_export.SHAPE)
    config = TrainConfig.from_dict(dict(base_model=str(tiny_phi3), dataset=str(exported.folder),
                                        output_dir=str(tmp_path / "run"), max_steps=4, per_device_batch_size=2,
                                        save_steps=2, learning_rate=1e-3, device="cpu"))
    result = train(config)
    assert result.steps == 4 and all(0 < loss < 50 for loss in result.losses)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]


# ----------------------------------------------------------------------------------------------- DDP on CPU
def run_training_subprocess(config, processes: int) -> subprocess.Popen:
    from M3DTrainingLib.jobs import build_command

    Path(config.output_dir).mkdir(parents=True)
    config.num_processes = processes
    path = config.to_yaml(Path(config.output_dir).parent / f"{Path(config.output_dir).name}.yaml")
    command = build_command(config, path, sys.executable)
    return subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_two_process_ddp_matches_one_process_with_the_doubled_batch(tiny_phi3, tmp_path):
    """accelerate launch, 2 CPU processes (gloo), batch 2 each == 1 process, batch 4 == 1 process, batch 2 with 2
    accumulation steps: losses and trained weights (LoRA and the fully trained parts)."""
    from safetensors.torch import load_file

    common = dict(dataset_kwargs={"size": 8, "masks": "all"}, max_steps=3, learning_rate=1e-3,
                  disable_dropout=True, lr_scheduler="cosine", warmup_ratio=0.3)
    one = synthetic_config(tiny_phi3, tmp_path / "one", per_device_batch_size=4, **common)
    two = synthetic_config(tiny_phi3, tmp_path / "two", per_device_batch_size=2, **common)
    accumulated = synthetic_config(tiny_phi3, tmp_path / "accumulated", per_device_batch_size=2,
                                   gradient_accumulation_steps=2, **common)
    procs = [run_training_subprocess(one, 1), run_training_subprocess(two, 2),
             run_training_subprocess(accumulated, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    start = next(e for e in read_events(two.output_dir) if e["stage"] == "start")
    assert start["details"]["num_processes"] == 2

    reference = train_losses(one.output_dir)
    assert list(reference) == [1, 2, 3]  # 8 samples / 4 per step: crosses an epoch
    for other in (two, accumulated):
        losses = train_losses(other.output_dir)
        assert list(losses) == [1, 2, 3]
        for step in reference:
            assert losses[step] == pytest.approx(reference[step], rel=1e-5), other.output_dir
        for name in ("trainable.safetensors", "adapter_model.safetensors"):
            a = load_file(str(Path(one.output_dir) / "adapter" / name))
            b = load_file(str(Path(other.output_dir) / "adapter" / name))
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)  # updates are ~1e-3
    base = load_file(str(tiny_phi3 / "model.safetensors"))
    trained = load_file(str(Path(one.output_dir) / "adapter" / "trainable.safetensors"))
    assert (trained["lm_head.weight"] - base["lm_head.weight"]).abs().max() > 1e-4  # the weights did move
