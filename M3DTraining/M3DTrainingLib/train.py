"""Fine-tuning M3D-LaMed as the official recipe does (BAAI-DCAI/M3D ``LaMed/src/train/train.py`` and
``LaMed/script/finetune_lora_phi3.sh``), on Hugging Face accelerate: the training loop and its checkpoints.

* What trains (stage ``projector`` / ``lora``, LoRA r=16, alpha=32, dropout 0.05 on every ``nn.Linear`` of the
  language model, the parts trained fully) is :mod:`.lora`'s; the config and presets are :mod:`.config`'s.
* Loss: the model's own :meth:`~M3DAssistantLib.model.modeling_lamed.LamedMixin.training_loss` (LM cross-entropy +
  Dice + BCE on the samples that have a mask) -- one model implementation for inference and training.
* Distribution is accelerate's: ``python -m M3DTrainingLib.train CONFIG.yaml`` runs one process;
  ``accelerate launch [--config_file F] -m M3DTrainingLib.train CONFIG.yaml`` runs 1..N GPUs, several machines or
  DeepSpeed ZeRO (``deepspeed_stage`` in the config, or the accelerate config). :mod:`.jobs` builds these commands
  and runs them detached; this module never imports it (``m3d train`` in :mod:`.cli` chooses between the two).
* Checkpoints every ``save_steps`` (:mod:`.checkpoints`: ``accelerator.save_state`` for the trainable weights and
  optimizer, JSON/safetensors for the scheduler, RNG states and data position), fsynced and renamed into place with a
  manifest; a killed run restarted with the same config resumes from the newest checkpoint that verifies, at the same
  step, and reproduces the same loss curve. Nothing pickled is unpickled on the way.
* Output ``OUTPUT_DIR/adapter/``: the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``), the
  trained non-LoRA weights under their official names (``trainable.safetensors``) and ``train_config.yaml``.
  :func:`M3DTrainingLib.merge.merge` turns it into a full checkpoint in the official layout.
* Progress: :class:`~.progress_log.TrainingProgressEvent` (a :class:`~M3DAssistantLib.progress.ProgressEvent` with
  metrics) to a callback; the run also appends every event to ``OUTPUT_DIR/progress.jsonl`` (read by :mod:`.jobs`
  and the module).

Heavy imports (torch, transformers, peft, accelerate) happen inside the functions, so ``m3d --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from M3DAssistantLib.errors import CheckpointError, ConfigError, M3DError
from M3DAssistantLib.outputs import ordinary_permissions
from M3DAssistantLib.progress import ProgressCallback, ProgressEvent
from M3DAssistantLib.units import format_bytes

from .checkpoints import (  # noqa: F401 (list_checkpoints, latest_checkpoint: this module's API before the split)
    TrainState,
    intact_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .config import (
    ADAPTER_DIR,
    CONFIG_FILE,
    PRESETS,
    PROGRESS_FILE,
    TRAINABLE_FILE,
    TrainConfig,
)
from .lora import official_name, prepare_model
from .memory import HEADROOM, estimate_memory, resolve_mixed_precision
from .preflight import check_dataset_fits_model
from .progress_log import ProgressLog, TrainingProgressEvent, record_interruption
from .run_lock import TRAIN_ROLE, RunLock, describe_holder

LAUNCHER_WAIT_S = 30.0
"""How long a trainer waits for a job launcher (or a status check) to let go of the run folder's lock."""

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, state: Optional[dict] = None) -> Path:
    """A durable, verifiable checkpoint (:func:`.checkpoints.save_checkpoint`) with this run's save options."""
    return save_checkpoint(accelerator, output_dir, step, keep, state, _state_kwargs(accelerator, "save"))


def _state_kwargs(accelerator, action: str) -> dict:
    """Checkpoints hold the trained weights only: DeepSpeed is told so by its own options, DDP/single process by
    the hooks of :func:`_register_checkpoint_hooks` (load non-strictly, the hook checks the key set)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"exclude_frozen_parameters": True} if action == "save" else {"load_module_strict": False}
    return {} if action == "save" else {"strict": False}


def _register_checkpoint_hooks(accelerator, trainable_names: set[str]) -> None:
    """Checkpoints hold only the trained weights (not the frozen multi-GB base); loading checks that set."""

    def keep_trainable(models, weights, output_dir):
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k.removeprefix("module.") in trainable_names}

    def check_saved_keys(models, input_dir):
        from safetensors import safe_open

        if not models:  # DeepSpeed loads its own checkpoint format
            return
        path = Path(input_dir) / "model.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{input_dir}: no model.safetensors; the checkpoint is incomplete. Delete it.")
        with safe_open(str(path), "pt") as f:
            saved = {k.removeprefix("module.") for k in f.keys()}
        if saved != trainable_names:
            raise CheckpointError(
                f"{input_dir}: the checkpoint's trained weights ({len(saved)}) do not match this run's "
                f"({len(trainable_names)}); the config changed since it was written. Use the original config or a "
                "new output_dir."
            )

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(check_saved_keys)

# --------------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    losses: list[float]
    resumed_from: Optional[int]


def _import_object(spec: str, what: str):
    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what} {spec!r} cannot be imported ({type(e).__name__}: {e}).") from e


def build_dataset(config: TrainConfig, tokenizer, num_image_tokens: int):
    factory = _import_object(config.dataset_factory, "dataset_factory")
    dataset = factory(config.dataset, tokenizer, num_image_tokens, split=config.split, augment=config.augment,
                      seed=config.seed, **config.dataset_kwargs)
    if len(dataset) == 0:
        raise ConfigError(f"{config.dataset}: the {config.split!r} split has no samples.")
    if config.collate_fn is not None:
        collate = _import_object(config.collate_fn, "collate_fn")
    elif callable(getattr(dataset, "collate", None)):
        collate = dataset.collate  # pads with the tokenizer's pad id
    else:
        raise ConfigError(f"{config.dataset_factory} has no collate method; set collate_fn: 'module:function'.")
    return dataset, collate


def _make_accelerator(config: TrainConfig, find_unused: bool):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs

    cpu = config.device == "cpu" or not torch.cuda.is_available()
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=find_unused)]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not cpu and torch.distributed.is_available() and not torch.distributed.is_nccl_available():
        logger.warning("NCCL is not available in this PyTorch (Windows?); using the gloo backend between GPUs, "
                       "which is slower. On Linux, install a CUDA build of PyTorch for NCCL.")
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    deepspeed_plugin = None
    if config.deepspeed_stage and not os.environ.get("ACCELERATE_USE_DEEPSPEED"):
        from accelerate.utils import is_deepspeed_available

        if cpu or not is_deepspeed_available():
            why = ("there is no CUDA GPU" if cpu
                   else "the deepspeed package is not installed (it does not support Windows)")
            logger.warning("deepspeed_stage=%d asked for but %s; training with plain DDP instead (more memory per "
                           "GPU, see the estimate).", config.deepspeed_stage, why)
        else:
            from accelerate.utils import DeepSpeedPlugin

            deepspeed_plugin = DeepSpeedPlugin(
                zero_stage=config.deepspeed_stage,
                gradient_accumulation_steps=config.gradient_accumulation_steps,
                gradient_clipping=config.max_grad_norm or None,
                # ZeRO-3 must gather the partitioned weights into full tensors when saving (official issue #59)
                zero3_save_16bit_model=True,
            )
    return Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(config, cuda=not cpu),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        kwargs_handlers=handlers,
        deepspeed_plugin=deepspeed_plugin,
        step_scheduler_with_optimizer=False,
    )


def _loss_vector(loss, parts: dict):
    """[loss, lm, dice, bce, has_seg] of one micro-batch: the same shape on every process (one all-reduce, even
    when only some processes had samples with masks)."""
    import torch

    has_seg = "dice" in parts
    zero = torch.zeros((), device=loss.device)
    values = [loss.detach(), parts.get("lm", zero), parts.get("dice", zero), parts.get("bce", zero)]
    return torch.stack([v.detach().float().reshape(()) for v in values] + [zero + float(has_seg)])


def _mean_losses(accelerator, window: list) -> dict[str, Optional[float]]:
    """Mean over the micro-batches of a step and over processes; dice/bce over the micro-batches that had masks."""
    import torch

    summed = accelerator.reduce(torch.stack(window).sum(dim=0), "sum").tolist()
    count = len(window) * accelerator.num_processes
    seg_count = summed[4]
    return {
        "loss": summed[0] / count,
        "lm": summed[1] / count,
        "dice": summed[2] / seg_count if seg_count else None,
        "bce": summed[3] / seg_count if seg_count else None,
    }


def _gpu_memory(accelerator) -> Optional[int]:
    import torch

    if accelerator.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(accelerator.device))
    return None


def train(config: TrainConfig, progress: Optional[ProgressCallback] = None) -> TrainResult:
    """Run (or resume) the training described by ``config`` in this process (one rank of an accelerate launch).

    Events go to ``progress`` and, on the main process, to ``OUTPUT_DIR/progress.jsonl``.
    """
    import torch
    from accelerate.utils import set_seed
    from safetensors.torch import save_file
    from transformers import get_scheduler

    from M3DAssistantLib.model import load_model

    config = config.with_absolute_paths()
    check_dataset_fits_model(config.dataset, config.base_model)  # before the model loads: one line with the fix
    output_dir = Path(config.output_dir)
    adapter_dir = output_dir / ADAPTER_DIR
    if adapter_dir.exists():
        raise ConfigError(f"{output_dir} already holds a finished run ({adapter_dir}); choose a new output_dir "
                          "(nothing is overwritten).")
    seg_parts = {"seg_projector", "seg_module", "seg_encoder", "seg_decoder"}
    accelerator = _make_accelerator(config, find_unused=bool(seg_parts & set(config.parts)))
    main = accelerator.is_main_process
    sinks: list[ProgressCallback] = []
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        sinks.append(ProgressLog(output_dir / PROGRESS_FILE))
        if progress is not None:
            sinks.append(progress)

    def emit(event: ProgressEvent) -> None:
        for sink in sinks:
            sink(event)

    set_seed(config.seed)
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    model, tokenizer = load_model(config.base_model, device=accelerator.device, dtype=dtype)
    estimate = estimate_memory(config, model.lamed_config, cuda=accelerator.device.type == "cuda",
                               processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision)
    if main:
        print(estimate.format(), flush=True)
        message = estimate.format().splitlines()[0]
        if accelerator.device.type == "cuda":
            available = torch.cuda.get_device_properties(accelerator.device).total_memory
            if estimate.total_bytes > HEADROOM * available:
                message = (f"the estimate ({format_bytes(estimate.total_bytes)}) exceeds this GPU's "
                           f"{format_bytes(available)}: use the one-24gb-gpu preset, a smaller batch with more "
                           "accumulation, gradient checkpointing, or more GPUs with DeepSpeed")
                logger.warning(message)
        emit(TrainingProgressEvent("estimate", None, message, details=estimate.to_dict()))
        config.to_yaml(output_dir / CONFIG_FILE)
    module = prepare_model(config, model)
    trainable = [p for p in module.parameters() if p.requires_grad]
    trainable_names = {n for n, p in module.named_parameters() if p.requires_grad}

    dataset, collate = build_dataset(config, tokenizer, model.num_image_tokens)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.per_device_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=config.num_workers,
        drop_last=False,
        # its own generator: creating a loader iterator must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(config.seed),
    )
    decay = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    if len(loader) == 0:
        raise ConfigError(f"{config.dataset}: too few samples for {accelerator.num_processes} process(es).")
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_epochs * steps_per_epoch)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    state = TrainState()  # saved as JSON with each checkpoint, as the scheduler's state (never pickled)
    _register_checkpoint_hooks(accelerator, trainable_names)

    resumed_from, skipped = _resume(accelerator, config, output_dir, state, scheduler)
    message = (f"resuming at step {state.global_step}/{total_steps}" if resumed_from is not None
               else f"training {total_steps} steps")
    if skipped:
        message += "; skipped " + "; ".join(f"{name} ({why})" for name, why in skipped)
    emit(TrainingProgressEvent(
        "start", state.global_step / total_steps, message, step=state.global_step, total_steps=total_steps,
        details={"resumed_from": resumed_from, "num_processes": accelerator.num_processes, "pid": os.getpid(),
                 "trainable_params": sum(p.numel() for p in trainable),
                 "skipped_checkpoints": [{"checkpoint": name, "reason": why} for name, why in skipped]},
    ))

    samples_per_step = config.per_device_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    losses: list[float] = []
    window: list = []  # per micro-batch loss vectors of the current optimizer step
    run_start = time.perf_counter()
    steps_this_run = 0
    log_start, log_steps = run_start, 0
    module.train()
    while state.global_step < total_steps:
        loader.set_epoch(state.epoch)
        if hasattr(dataset, "set_epoch"):  # datasets that seed their augmentation per epoch
            dataset.set_epoch(state.epoch)
        epoch_loader = (accelerator.skip_first_batches(loader, state.batches_in_epoch)
                        if state.batches_in_epoch else loader)
        if state.batches_in_epoch:
            epoch_loader.set_epoch(state.epoch)
        for batch in epoch_loader:
            with accelerator.accumulate(module):
                loss, parts = module(
                    images=batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], segs=batch.get("segs"),
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            window.append(_loss_vector(loss, parts))
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            state.global_step += 1
            steps_this_run += 1
            log_steps += 1
            means = _mean_losses(accelerator, window)
            window.clear()
            step_loss = means["loss"]
            losses.append(step_loss)
            if state.global_step % config.logging_steps == 0 or state.global_step == total_steps:
                now = time.perf_counter()
                rate = log_steps * samples_per_step / max(now - log_start, 1e-9)
                eta = (total_steps - state.global_step) * (now - run_start) / steps_this_run
                emit(TrainingProgressEvent(
                    "train", state.global_step / total_steps,
                    f"step {state.global_step}/{total_steps} loss {step_loss:.4f} lr {lr:.2e}",
                    step=state.global_step, total_steps=total_steps,
                    epoch=state.epoch + state.batches_in_epoch / len(loader),
                    loss=step_loss, lm_loss=means["lm"], dice_loss=means["dice"], bce_loss=means["bce"],
                    lr=lr, samples_per_s=rate, eta_s=eta, gpu_memory_bytes=_gpu_memory(accelerator),
                ))
                log_start, log_steps = now, 0
            if state.global_step % config.save_steps == 0 and state.global_step < total_steps:
                # at an epoch's end batches_in_epoch == len(loader): a resume skips them all and starts the next
                path = _save_checkpoint(accelerator, output_dir, state.global_step, config.save_total_limit,
                                        {"train_state": state.state_dict(), "scheduler": scheduler.state_dict()})
                emit(TrainingProgressEvent("checkpoint", state.global_step / total_steps, f"saved {path.name}",
                                           step=state.global_step, total_steps=total_steps))
            if state.global_step >= total_steps:
                break
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    _save_outputs(accelerator, module, config, output_dir, save_file)
    emit(TrainingProgressEvent("done", 1.0, f"finished {total_steps} steps; adapter in {adapter_dir}",
                               step=state.global_step, total_steps=total_steps,
                               loss=losses[-1] if losses else None))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir, adapter_dir, state.global_step, losses, resumed_from)


def _resume(accelerator, config: TrainConfig, output_dir: Path, state: TrainState,
            scheduler) -> tuple[Optional[int], list[tuple[str, str]]]:
    """Load the newest checkpoint that verifies and loads safely: ``(its step or None, [(skipped, why), ...])``.
    Every checkpoint failing is an error (nothing is retrained over them silently)."""
    checkpoints = list_checkpoints(output_dir)
    if checkpoints and not config.resume:
        raise ConfigError(f"{output_dir} holds checkpoints of an earlier run ({checkpoints[-1].name}) and resume is "
                          "off; set resume: true to continue it, or choose a new output_dir (nothing is overwritten).")

    def apply(saved: dict) -> None:
        state.load_state_dict(saved["train_state"])
        scheduler.load_state_dict(saved["scheduler"])

    skipped: list[tuple[str, str]] = []
    for folder, why in intact_checkpoints(output_dir):
        if why is None:
            try:
                load_checkpoint(accelerator, folder, _state_kwargs(accelerator, "load"), apply)
            except CheckpointError as e:
                why = str(e).removeprefix(f"{folder.name}: ")
            else:
                logger.info("resumed from %s (step %d)", folder, state.global_step)
                return state.global_step, skipped
        logger.warning("not resuming from %s: %s", folder, why)
        skipped.append((folder.name, why))
    if skipped:
        raise CheckpointError(
            f"{output_dir}: none of its checkpoints can be resumed: "
            + "; ".join(f"{name}: {why}" for name, why in skipped)
            + ". Move them away to start over in this folder, or choose a new output_dir.")
    return None, skipped


def _save_outputs(accelerator, module, config: TrainConfig, output_dir: Path, save_file) -> None:
    """``OUTPUT_DIR/adapter``: PEFT adapter, trained non-LoRA weights (official names), training config."""
    # Collective under DeepSpeed ZeRO-3: gathers the partitioned parameters into full tensors first; saving
    # the partitions directly gives the empty tensors of official issue #59.
    state = accelerator.get_state_dict(module)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(module)
    trained = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    final = output_dir / ADAPTER_DIR
    tmp = output_dir / f".tmp-{ADAPTER_DIR}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if config.stage == "lora":
        peft_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        unwrapped.model.save_pretrained(str(tmp), state_dict=peft_state, safe_serialization=True,
                                        save_embedding_layers=False)
    weights = {official_name(n): state[n].detach().to("cpu").contiguous()
               for n in sorted(trained) if "lora_" not in n}
    if weights:
        save_file(weights, str(tmp / TRAINABLE_FILE), metadata={"format": "pt"})
    config.to_yaml(tmp / CONFIG_FILE)
    ordinary_permissions(tmp)
    tmp.rename(final)



# ----------------------------------------------------------------------------------------------- one process
def run_training(config: TrainConfig, progress: Optional[ProgressCallback] = None) -> TrainResult:
    """:func:`train` holding the run folder's lock (:mod:`.run_lock`: a second run in the same folder is refused,
    naming the first one's process), and when it fails, the reason as the last line of ``progress.jsonl`` (what a
    job's status and the panel show). A run that died earlier without a word (SIGKILL, out of memory) is recorded as
    interrupted first."""
    lock = None
    if os.environ.get("RANK", "0") == "0" and config.output_dir:  # rank 0 holds it for all ranks of a launch
        # a job's launcher holds the lock for a moment while it starts us: wait for it (a trainer is refused at once)
        lock = RunLock(config.with_absolute_paths().output_dir).acquire(TRAIN_ROLE, wait_s=LAUNCHER_WAIT_S)
    try:
        if lock is not None and lock.stale is not None and lock.stale.get("role") == TRAIN_ROLE:
            record_interruption(lock.output_dir / PROGRESS_FILE, (
                f"the run of {describe_holder(lock.stale)} ended without a final event (killed, out of memory or the "
                f"machine stopped); resume continues it from the newest checkpoint"))
        return train(config, progress=progress)
    except BaseException as e:
        _record_failure(config, e)
        raise
    finally:
        if lock is not None:
            lock.release()


def _record_failure(config: TrainConfig, error: BaseException) -> None:
    """The last line of progress.jsonl says why the run stopped (for jobs and the module)."""
    if os.environ.get("RANK", "0") != "0" or not config.output_dir:
        return
    if (Path(config.output_dir) / ADAPTER_DIR).exists():  # refused to touch a finished run: leave its log as is
        return
    if isinstance(error, KeyboardInterrupt):
        message = "interrupted (Ctrl+C)"
    elif isinstance(error, SystemExit):
        message = str(error.code) if isinstance(error.code, str) else f"exited with status {error.code}"
    else:
        message = f"{type(error).__name__}: {error}"
    try:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        ProgressLog(Path(config.output_dir) / PROGRESS_FILE)(TrainingProgressEvent("error", None, message))
    except OSError:
        pass


def exit_on_termination() -> None:
    """SIGTERM (a cancel, a shutdown, a scheduler's time limit) and SIGHUP (the terminal closed) end the run through
    :func:`run_training`'s error path -- recorded in ``progress.jsonl``, lock released -- instead of killing it
    silently. Only the main thread may install handlers: called from another (``m3d train`` run inside a host
    program's thread) it leaves the host's handlers alone. SIGKILL cannot be caught (the next process to use the
    folder records it)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise SystemExit(f"stopped by {signal.Signals(signum).name} (cancelled, shut down or killed by a scheduler); "
                         f"resume continues from the newest checkpoint")

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file and what overrides it: arguments of ``python -m M3DTrainingLib.train`` and ``m3d train``."""
    parser.add_argument("config", help="training config YAML (keys: M3DTrainingLib.config.TrainConfig)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, VALUE as YAML (repeatable), e.g. --set max_steps=100")
    parser.add_argument("--preset", default=None, help=f"one of {sorted(PRESETS)} (overrides the file's preset)")
    parser.add_argument("--estimate-only", action="store_true", help="print the memory estimate and exit")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of :func:`add_config_arguments` (and ``--num-processes`` where the parser has it)."""
    overrides = list(args.set or [])
    if args.preset:
        overrides.append(f"preset={args.preset}")
    if getattr(args, "num_processes", None):
        overrides.append(f"num_processes={args.num_processes}")
    return TrainConfig.from_yaml(args.config, overrides)


def print_event(event: ProgressEvent) -> None:
    """A progress event as one line on stderr."""
    print(f"[{event.stage}] {event.message}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m M3DTrainingLib.train CONFIG``: train in this process, one rank of an ``accelerate launch`` or
    alone. What :mod:`.jobs` launches; ``m3d train`` (:mod:`.cli`) also starts several processes and background jobs.
    """
    parser = argparse.ArgumentParser(
        prog="python -m M3DTrainingLib.train", description="Train in this process (one rank of an accelerate launch).",
        epilog="Background jobs and several processes: m3d train CONFIG [--detach] [--num-processes N].")
    add_config_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        if args.estimate_only:
            print(estimate_memory(config).format())
            return 0
        if config.num_processes > 1 and "LOCAL_RANK" not in os.environ:
            raise ConfigError(f"num_processes is {config.num_processes}: start the processes with m3d train "
                              f"{args.config} (it runs accelerate launch), or accelerate launch --num_processes "
                              f"{config.num_processes} -m M3DTrainingLib.train {args.config}.")
        exit_on_termination()
        result = run_training(config, progress=None if args.quiet else print_event)
    except M3DError as e:
        print(f"m3d train: error: {e}", file=sys.stderr)
        return 2
    print(f"trained {result.steps} steps; adapter: {result.adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
