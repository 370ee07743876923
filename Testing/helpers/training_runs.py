"""Training runs in the tests: the synthetic config (training_synthetic.py's dataset on a tiny checkpoint, CPU), the
environment a trainer subprocess needs, and what a run left in its progress.jsonl."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from repo_paths import HELPERS


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HELPERS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def synthetic_config(ckpt: Path, output_dir: Path, **overrides):
    from M3DTrainingLib.config import TrainConfig

    values = dict(
        base_model=str(ckpt),
        dataset=str(output_dir.parent / "unused-dataset"),
        output_dir=str(output_dir),
        dataset_factory="training_synthetic:SyntheticM3DDataset",
        collate_fn="training_synthetic:collate",
        dataset_kwargs={"size": 4},
        device="cpu",
        per_device_batch_size=4,
        max_steps=20,
        learning_rate=1e-2,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        save_steps=100,
        augment=False,
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)


def read_events(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "progress.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> dict[int, float]:
    """step -> loss of the LAST launch in progress.jsonl (a resumed run appends to the same file)."""
    events = read_events(output_dir)
    starts = [i for i, e in enumerate(events) if e["stage"] == "start"]
    return {e["step"]: e["loss"] for e in events[starts[-1]:] if e["stage"] == "train"}


def job_env() -> dict:
    env = subprocess_env()
    return {k: env[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")}


def wait_until(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")
