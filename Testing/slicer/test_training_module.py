"""The M3DTraining panel without a real Slicer.

* the panel's Qt-free helpers in ``M3DTrainingLib`` (gpus, panel_config, job_monitor, loss_curve, evaluation_job,
  ...): GPU list parsing from nvidia-smi output and its detection with fake tools, memory warnings, panel state ->
  training config, progress-file tailing, the loss curve, helper processes, evaluation output;
* the loss-curve and evaluation table nodes on slicer-core MRML (``headless_slicer``);
* ``M3DTraining.py`` imported under the test harness (``Testing/helpers/slicer_harness``): its parameter node, its Logic
  (a whole job with a fake trainer process: start, live progress, reconnect from a new Logic, cancel, resume,
  "Use in M3DAssistant") and its own Slicer self-tests. The panel as a user drives it: test_training_panel.py.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from fake_trainer import FAKE_TRAINING_PYTHON
from module_files import parameter_node_fields, run_slicer_self_test, ui_widgets
from repo_paths import REPO

from M3DAssistantLib.errors import ConfigError, InputError, M3DError
from M3DAssistantLib.settings import MemorySettings
from M3DTrainingLib import requirements
from M3DTrainingLib.config import EVALUATION_DIR
from M3DTrainingLib.evaluation_job import (
    evaluation_command,
    evaluation_rows,
    evaluation_table_node,
    format_evaluation,
    latest_evaluation,
    next_evaluation_stem,
    parse_evaluation_output,
)
from M3DTrainingLib.gpus import (
    NVIDIA_SMI_ARGUMENTS,
    GpuDetector,
    GpuInfo,
    GpuQueryResult,
    format_gpu_selection,
    parse_gpu_selection,
    parse_nvidia_smi,
    parse_torch_gpu_query,
)
from M3DTrainingLib.helper_process import BackgroundCommand
from M3DTrainingLib.job_monitor import HelperQueue, format_duration, format_progress, remember_folder
from M3DTrainingLib.loss_curve import LossCurve, fill_loss_table, find_loss_curve_nodes, loss_curve_nodes
from M3DTrainingLib.memory import DEFAULT_ESTIMATES, parse_estimate_total
from M3DTrainingLib.merge import finished_model, merge_command
from M3DTrainingLib.panel_config import (
    DEEPSPEED_OFF,
    PRESET_OFFICIAL,
    PRESET_ONE_GPU,
    PRESET_PARAMETERS,
    SOURCE_SCENE_FILES,
    STAGE_LORA,
    TASK_PARAMETERS,
    TASKS,
    PanelState,
    build_train_config,
    check_dataset_tasks,
    config_signature,
    dataset_counts,
    folder_text,
    format_dataset_counts,
    memory_warnings,
    preset_panel_values,
    required_memory,
)
from M3DTrainingLib.progress_log import ProgressTail
from M3DTrainingLib.python_env import helper_environment
from M3DTrainingLib.requirements import missing_modules
from M3DTrainingLib.scene_nodes import FOLDER_ATTRIBUTE, ROLE_ATTRIBUTE

MIB = 1024**2
GIB = 1024**3
POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="fake tools are POSIX scripts")

# What `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader` prints on a two-GPU workstation.
NVIDIA_SMI_SAMPLE = "NVIDIA GeForce RTX 4090, 24564 MiB\nNVIDIA RTX A6000, 49140 MiB\n"


# ----------------------------------------------------------------------------------------------------------------------
# GPUs


def test_parse_nvidia_smi_sample_output():
    gpus = parse_nvidia_smi(NVIDIA_SMI_SAMPLE)
    assert gpus == [GpuInfo(0, "NVIDIA GeForce RTX 4090", 24564 * MIB),
                    GpuInfo(1, "NVIDIA RTX A6000", 49140 * MIB)]
    assert gpus[0].label() == "GPU 0: NVIDIA GeForce RTX 4090 (24.0 GiB)"
    assert gpus[1].label() == "GPU 1: NVIDIA RTX A6000 (48.0 GiB)"


def test_parse_nvidia_smi_with_index_without_units_and_noise():
    text = ("0, NVIDIA H100 80GB HBM3, 81559 MiB\n"
            "\n"
            "3, Tesla T4, 15360\n"  # --format=csv,noheader,nounits
            "1, NVIDIA GB10, [N/A]\n"  # unified memory: not reported
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
            "Failed to initialize NVML: Driver/library version mismatch, 2\n")
    assert parse_nvidia_smi(text) == [GpuInfo(0, "NVIDIA H100 80GB HBM3", 81559 * MIB),
                                      GpuInfo(3, "Tesla T4", 15360 * MIB),
                                      GpuInfo(1, "NVIDIA GB10", None)]
    assert GpuInfo(1, "NVIDIA GB10", None).label() == "GPU 1: NVIDIA GB10 (memory unknown)"
    assert parse_nvidia_smi("No devices were found\n") == []


def test_parse_torch_gpu_query():
    assert parse_torch_gpu_query('warning\nM3D-GPUS [{"index": 0, "name": "A100", "memory_bytes": 42}]\n') == [
        GpuInfo(0, "A100", 42)]
    assert parse_torch_gpu_query("M3D-GPUS []") == []
    assert parse_torch_gpu_query("Traceback ...\nModuleNotFoundError: No module named 'torch'") is None


def _script(path: Path, body: str) -> str:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@POSIX_ONLY
def test_gpu_detector_uses_nvidia_smi_with_query_arguments(tmp_path):
    args_file = tmp_path / "args.txt"
    smi = _script(tmp_path / "nvidia-smi", f"#!/bin/sh\necho \"$@\" > {args_file}\nprintf '{NVIDIA_SMI_SAMPLE}'\n")
    result = GpuDetector(python=None, nvidia_smi=smi).wait(timeout=30)
    assert result.source == "nvidia-smi" and [g.name for g in result.gpus] == ["NVIDIA GeForce RTX 4090",
                                                                               "NVIDIA RTX A6000"]
    assert result.message == "2 GPU(s) found with nvidia-smi"
    assert args_file.read_text().split() == list(NVIDIA_SMI_ARGUMENTS)


@POSIX_ONLY
def test_gpu_detector_falls_back_to_torch_in_the_training_python(tmp_path):
    smi = _script(tmp_path / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver'\nexit 9\n")
    python = _script(tmp_path / "python", '#!/bin/sh\n[ "$1" = "-c" ] && echo \'M3D-GPUS [{"index": 0, "name": '
                                          '"AMD Instinct MI210", "memory_bytes": 68702699520}]\'\n')
    detector = GpuDetector(python=python, nvidia_smi=smi)
    result = None
    for _ in range(600):  # what the panel's timer does
        result = detector.poll()
        if result is not None:
            break
        time.sleep(0.05)
    assert result == GpuQueryResult([GpuInfo(0, "AMD Instinct MI210", 68702699520)], "torch",
                                    "1 GPU(s) found with torch")


@POSIX_ONLY
def test_gpu_detector_without_gpu_says_training_would_use_the_cpu(tmp_path):
    smi = _script(tmp_path / "nvidia-smi", "#!/bin/sh\necho 'No devices were found'\n")
    no_torch = _script(tmp_path / "python", "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\"\n"
                                            "exit 1\n")
    result = GpuDetector(python=no_torch, nvidia_smi=smi).wait(timeout=30)
    assert result.gpus == [] and result.source == "torch"
    assert "nvidia-smi found no GPU (No devices were found)" in result.message
    assert "No module named 'torch'" in result.message and "CPU" in result.message
    result = GpuDetector(python=None, nvidia_smi=str(tmp_path / "missing-nvidia-smi")).wait(timeout=30)
    assert result.gpus == [] and "nvidia-smi could not be started" in result.message


# ----------------------------------------------------------------------------------------------------------------------
# Memory


def test_memory_warnings_name_the_gpu_and_the_fix():
    rtx = GpuInfo(0, "NVIDIA GeForce RTX 4090", 24564 * MIB)
    a100 = GpuInfo(1, "NVIDIA A100-SXM4-80GB", 81920 * MIB)
    unknown = GpuInfo(2, "NVIDIA GB10", None)
    gpus = [rtx, a100, unknown]
    official = DEFAULT_ESTIMATES["official"]
    (warning,) = memory_warnings(gpus, [0, 1], official, "the estimate")
    assert warning.startswith("GPU 0 (NVIDIA GeForce RTX 4090) has 24.0 GiB, but this training needs about 38.1 GiB")
    assert PRESET_ONE_GPU in warning and "gradient accumulation" in warning
    assert memory_warnings(gpus, [0], DEFAULT_ESTIMATES["one-24gb-gpu"]) == []
    assert memory_warnings(gpus, [1], official) == []
    # the margin the trainer uses: above 95 % of the GPU's memory is too much
    assert memory_warnings([rtx], [0], int(0.95 * rtx.memory_bytes)) == []
    assert len(memory_warnings([rtx], [0], int(0.95 * rtx.memory_bytes) + 1)) == 1
    assert "does not report its memory" in memory_warnings(gpus, [2], official)[0]
    assert "not among the detected GPUs" in memory_warnings(gpus, [5], official)[0]
    assert "runs on the CPU" in memory_warnings(gpus, [], official)[0]
    assert memory_warnings(gpus, [0], None) == []  # nothing estimated: nothing to compare


def test_required_memory_prefers_an_estimate_for_the_same_settings():
    state = PanelState(dataset_folder="/d", output_folder="/o")
    assert required_memory(state) == (DEFAULT_ESTIMATES["one-24gb-gpu"],
                                      "estimate for the preset's defaults with M3D-LaMed-Phi-3-4B")
    estimates = {config_signature(state): 12 * GIB}
    assert required_memory(state, estimates) == (12 * GIB, "estimated for these settings")
    # the output folder or the seed do not change the memory; the batch does
    other_run = PanelState(dataset_folder="/x", output_folder="/y", seed=7)
    assert required_memory(other_run, estimates)[0] == 12 * GIB
    bigger = PanelState(dataset_folder="/d", output_folder="/o", batch_size=8)
    assert required_memory(bigger, estimates)[0] == DEFAULT_ESTIMATES["one-24gb-gpu"]
    assert required_memory(PanelState(preset="official"))[0] == DEFAULT_ESTIMATES["official"]


def test_default_estimates_are_the_trainers_estimates():
    pytest.importorskip("torch")
    from M3DAssistantLib.model import random_checkpoint as rc
    from M3DAssistantLib.model.configuration_lamed import parse_lamed_config
    from M3DTrainingLib.config import TrainConfig
    from M3DTrainingLib.memory import estimate_memory

    phi3 = parse_lamed_config(rc.official_config("phi3", vocab_size=32014, seg_token_id=32013, eos_token_id=32000,
                                                 pad_token_id=32000), source="official Phi-3 4B")
    for preset, expected in DEFAULT_ESTIMATES.items():
        config = TrainConfig.from_dict({"preset": preset, "dataset": "/d", "output_dir": "/o"})
        estimate = estimate_memory(config, phi3, cuda=True)
        assert estimate.total_bytes == pytest.approx(expected, rel=0.02), (
            f"memory.DEFAULT_ESTIMATES[{preset!r}] is out of date: the trainer now estimates "
            f"{estimate.total_bytes} bytes")
        assert parse_estimate_total(estimate.format()) == pytest.approx(estimate.total_bytes, abs=0.006 * GIB)


def test_parse_estimate_total():
    text = "Memory estimate per device (...):\n  weights   7.74 GiB\n  total     9.48 GiB\n"
    assert parse_estimate_total(text) == int(9.48 * GIB)
    assert parse_estimate_total("m3d train: error: no config") is None


# ----------------------------------------------------------------------------------------------------------------------
# Panel state -> training config


def test_panel_defaults_are_the_one_gpu_preset():
    defaults = PanelState()
    values = preset_panel_values(PRESET_ONE_GPU)
    assert values == preset_panel_values("one-24gb-gpu") == preset_panel_values("one 24 GB GPU")
    assert (defaults.learning_rate, defaults.num_epochs, defaults.batch_size, defaults.gradient_accumulation,
            defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout, defaults.gradient_checkpointing) == tuple(
        values[name] for name in ("learningRate", "numEpochs", "batchSize", "gradientAccumulation", "loraRank",
                                  "loraAlpha", "loraDropout", "gradientCheckpointing"))
    assert defaults.tasks == TASKS
    from M3DTrainingLib.export import TASKS as EXPORT_TASKS

    assert TASKS == EXPORT_TASKS and list(TASK_PARAMETERS.values()) == list(EXPORT_TASKS)


def test_train_config_from_the_panel(tmp_path):
    from M3DTrainingLib.config import OFFICIAL_PARTS, PRESETS, TrainConfig

    state = PanelState(dataset_folder=str(tmp_path / "ds"), output_folder=str(tmp_path / "run"), gpus=(0,),
                       deepspeed_stage=2, max_steps=0, learning_rate=1e-4, save_steps=50)
    config = build_train_config(state)
    assert (config.preset, config.stage, config.device, config.num_processes) == ("one-24gb-gpu", "lora", "auto", 1)
    assert config.deepspeed_stage == 0  # ZeRO on one GPU only adds overhead
    assert config.mixed_precision == "bf16" and config.gradient_checkpointing
    assert config.trainable_parts == PRESETS["one-24gb-gpu"]["trainable_parts"]
    assert (config.max_steps, config.learning_rate, config.save_steps) == (-1, 1e-4, 50)
    assert config.dataset_kwargs == {}  # every task
    assert (config.dataset, config.output_dir) == (str(tmp_path / "ds"), str(tmp_path / "run"))
    # the config survives the YAML file the job reads
    assert TrainConfig.from_yaml(config.to_yaml(tmp_path / "c.yaml")) == config

    two_gpus = build_train_config(PanelState(dataset_folder="/d", output_folder="/o", gpus=(0, 1),
                                             deepspeed_stage=3, preset="official", batch_size=8, max_steps=20,
                                             tasks=("seg", "report")))
    assert (two_gpus.num_processes, two_gpus.deepspeed_stage, two_gpus.device) == (2, 3, "auto")
    assert two_gpus.max_steps == 20 and two_gpus.parts == list(OFFICIAL_PARTS["lora"])
    assert two_gpus.dataset_kwargs == {"tasks": ["report", "seg"]}  # the export's order

    cpu = build_train_config(PanelState(dataset_folder="/d", output_folder="/o", stage="projector"))
    assert (cpu.device, cpu.num_processes, cpu.mixed_precision) == ("cpu", 1, "auto")  # fp32, not the preset's bf16
    assert cpu.parts == list(OFFICIAL_PARTS["projector"])

    with pytest.raises(ConfigError, match="choose the dataset folder"):
        build_train_config(PanelState(output_folder="/o"))
    with pytest.raises(ConfigError, match="choose the output folder"):
        build_train_config(PanelState(dataset_folder="/d"))
    with pytest.raises(ConfigError, match="no task is chosen"):
        build_train_config(PanelState(dataset_folder="/d", output_folder="/o", tasks=()))
    with pytest.raises(ConfigError, match="lora_dropout"):
        build_train_config(PanelState(dataset_folder="/d", output_folder="/o", lora_dropout=1.5))


def test_gpu_selection_text():
    assert parse_gpu_selection("0, 2,2") == (0, 2)
    assert parse_gpu_selection("cpu") == parse_gpu_selection("") == ()
    assert format_gpu_selection([1, 3]) == "1,3"
    with pytest.raises(ValueError, match="GPU numbers"):
        parse_gpu_selection("cuda:0")
    assert folder_text(Path()) == "" and folder_text(Path("/a/b")) == str(Path("/a/b"))


def test_dataset_counts_and_task_check(tmp_path):
    with pytest.raises(InputError, match="no dataset.json"):
        dataset_counts(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "format": "m3d-slicer-dataset", "seg": {"train": [{}, {}], "validation": [{}]},
        "report": {"train": [{}], "validation": []}}))
    counts = dataset_counts(tmp_path)
    assert counts["seg"] == {"train": 2, "validation": 1} and counts["vqa_open"] == {"train": 0, "validation": 0}
    assert format_dataset_counts(counts) == "report 1 + 0, seg 2 + 1"
    assert check_dataset_tasks(counts, ["seg", "rec"]) == ["no training samples for the task 'rec': it is left out"]
    with pytest.raises(InputError, match=r"chosen tasks \(vqa_open, rec\); it has report, seg"):
        check_dataset_tasks(counts, ["rec", "vqa_open"])


def test_helper_environment_reaches_the_lib_packages_and_orders_gpus(tmp_path):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(helper_environment([1, 0], base={"PYTHONPATH": "/elsewhere"}))
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "1,0"
    assert env["PYTHONPATH"].split(os.pathsep)[-1] == "/elsewhere"
    assert helper_environment([])["CUDA_VISIBLE_DEVICES"] == ""  # the CPU: no GPU visible
    assert "CUDA_VISIBLE_DEVICES" not in helper_environment()
    # a Python started elsewhere finds both Lib packages (Slicer puts them on its own sys.path only)
    done = subprocess.run([sys.executable, "-S", "-c", "import M3DTrainingLib.python_env, M3DAssistantLib.errors"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_modules_are_found_in_the_training_python():
    assert missing_modules(sys.executable, ["json", "no_such_module_m3d", "M3DTrainingLib"],
                           env={**os.environ, **helper_environment()}) == ["no_such_module_m3d"]
    with pytest.raises(M3DError, match="cannot be run"):
        missing_modules("/no/such/python", ["json"])


def test_training_python_is_checked_with_the_one_installer(training, tmp_path, monkeypatch):
    """The Training Python setting's Python is checked against Resources/Requirements/M3DTraining.txt, never
    changed; what it lacks is named with the pip command (the requirement files themselves: test_dependencies.py)."""
    logic = _logic(training, pythonExecutable=sys.executable)
    logic.ensureTrainingPython()  # this Python has everything
    requirements_file = tmp_path / "M3DTraining.txt"
    requirements_file.write_text("pytest>=1\nno-such-trainer-package>=2.0\n")
    with monkeypatch.context() as patch:
        patch.setattr(training, "REQUIREMENTS_FILE", requirements_file)
        with pytest.raises(M3DError, match=r"The training Python .* lacks no-such-trainer-package>=2\.0\. Install "
                                           r"them there \(.* -m pip install \"no-such-trainer-package>=2\.0\"\)"):
            logic.ensureTrainingPython()
    monkeypatch.setattr(requirements, "TRAINING_MODULES", ("json", "no_such_trainer_module"))
    with pytest.raises(M3DError, match="cannot import no_such_trainer_module"):
        logic.ensureTrainingPython()


# ----------------------------------------------------------------------------------------------------------------------
# Progress and loss curve


def test_progress_tail_reads_only_new_lines(tmp_path, monkeypatch):
    from M3DAssistantLib.progress import ProgressEvent
    from M3DTrainingLib.progress_log import ProgressLog, TrainingProgressEvent

    path = tmp_path / "progress.jsonl"
    tail = ProgressTail(path)
    assert tail.read_new() == ([], False)  # no file yet
    log = ProgressLog(path)
    log(ProgressEvent("start", 0.0, "training 3 steps"))
    log(TrainingProgressEvent("train", 1 / 3, "step 1", step=1, loss=2.0))
    offsets = []
    real_read = ProgressLog.read
    monkeypatch.setattr(ProgressLog, "read", staticmethod(lambda p, offset=0: offsets.append(offset) or
                                                          real_read(p, offset)))
    events, restarted = tail.read_new()
    assert [e["stage"] for e in events] == ["start", "train"] and not restarted
    assert tail.read_new() == ([], False) and offsets == [0]  # nothing new: the file is not even read
    with open(path, "a") as f:
        f.write('{"stage": "train", "step": 2, "lo')  # the trainer is in the middle of a line
    assert tail.read_new() == ([], False)
    with open(path, "a") as f:
        f.write('ss": 1.5}\n')
    assert tail.read_new() == ([{"stage": "train", "step": 2, "loss": 1.5}], False)
    assert offsets[1:] == [offsets[1], offsets[1]] and offsets[1] > 0  # each read starts where the last ended
    # a new file in its place (a new run in the same folder): read from the start
    path.unlink()
    log(TrainingProgressEvent("train", 0.5, "step 1", step=1, loss=9.0))
    events, restarted = tail.read_new()
    assert restarted and [e["loss"] for e in events] == [9.0]


def test_loss_curve_keeps_the_resumed_runs_values():
    curve = LossCurve()
    assert not curve.add([{"stage": "estimate", "message": "x"}])
    assert curve.add([{"stage": "train", "step": s, "loss": 10.0 - s, "lr": 1e-4} for s in (1, 2, 3, 4)])
    assert curve.steps == [1, 2, 3, 4] and curve.losses == [9.0, 8.0, 7.0, 6.0]
    # killed after step 4, resumed from the checkpoint at step 2: steps 3 and 4 are trained again
    assert curve.add([{"stage": "start", "step": 2}])
    assert curve.steps == [1, 2]
    curve.add([{"stage": "train", "step": 3, "loss": 6.5}, {"stage": "train", "step": 4, "loss": 5.5, "lr": None},
               {"stage": "train", "step": 5, "loss": float("nan")}, {"stage": "train", "step": 6, "loss": None}])
    assert curve.steps == [1, 2, 3, 4] and curve.losses == [9.0, 8.0, 6.5, 5.5]
    assert curve.learning_rates[:2] == [1e-4, 1e-4] and math.isnan(curve.learning_rates[3])
    # a repeated step without a start event (another writer) also replaces the later ones
    curve.add([{"stage": "train", "step": 2, "loss": 1.0}])
    assert curve.steps == [1, 2] and curve.losses == [9.0, 1.0]


def test_progress_line_and_durations():
    event = {"stage": "train", "step": 120, "total_steps": 500, "epoch": 1.25, "loss": 0.42133, "lr": 4.1e-05,
             "samples_per_s": 3.25, "eta_s": 3725.0, "gpu_memory_bytes": 18 * GIB}
    assert format_progress(event) == ("step 120/500 \u00b7 epoch 1.25 \u00b7 loss 0.4213 \u00b7 lr 4.10e-05 "
                                      "\u00b7 3.25 samples/s \u00b7 ETA 1 h 02 min \u00b7 GPU memory 18.0 GiB")
    assert format_progress({"step": 3}) == "step 3" and format_progress(None) == ""
    assert [format_duration(s) for s in (None, 5, 125, 7260)] == ["?", "5 s", "2 min 05 s", "2 h 01 min"]


def test_remember_folder():
    assert remember_folder(["/b", "/a", "/c"], "/a", limit=3) == ["/a", "/b", "/c"]
    assert remember_folder([str(i) for i in range(20)], "/new", limit=5) == ["/new", "0", "1", "2", "3"]


# ----------------------------------------------------------------------------------------------------------------------
# Helper processes, evaluation, merge


def test_background_command_poll_timeout_and_cancel():
    quick = BackgroundCommand([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    result = quick.wait(timeout=60)
    assert result.ok and result.output.split() == ["out", "err"] and quick.poll() is result
    slow = BackgroundCommand([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=0.3)
    assert slow.poll() is None  # never blocks
    start = time.monotonic()
    result = slow.wait()
    assert result.timed_out and not result.ok and time.monotonic() - start < 30
    hung = BackgroundCommand([sys.executable, "-c", "import time; time.sleep(60)"])
    assert hung.cancel().cancelled
    failed = BackgroundCommand([sys.executable, "-c", "raise SystemExit('boom')"]).wait(timeout=60)
    assert failed.returncode == 1 and failed.tail(1) == "boom"
    with pytest.raises(OSError):
        BackgroundCommand(["/no/such/program"])


def test_evaluation_script_writes_metrics_without_overwriting(tmp_path):
    pytest.importorskip("matplotlib")
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("\n".join(json.dumps(r) for r in [
        {"task": "vqa_closed", "prediction": "C. Liver", "answer_choice": "C"},
        {"task": "vqa_closed", "prediction": "A. Spleen", "answer_choice": "C"},
        {"task": "rec", "prediction": "Coordinates are <bx_start>[0.0, 0.0, 0.0, 0.5, 0.5, 0.5]<bx_end>.",
         "reference_box": [0.0, 0.0, 0.0, 0.5, 0.5, 0.5]},
    ]) + "\n")
    folder = tmp_path / "run" / EVALUATION_DIR
    env = {**os.environ, **helper_environment()}
    for expected_stem in ("metrics", "metrics-2"):
        stem = next_evaluation_stem(folder)
        assert stem == expected_stem
        result = BackgroundCommand(evaluation_command(sys.executable, predictions, folder, stem),
                                   env=env).wait(timeout=120)
        assert result.ok, result.output
        paths = parse_evaluation_output(result.output)
        assert paths == {"json": str(folder / f"{stem}.json"), "png": str(folder / f"{stem}.png")}
        folder.mkdir(exist_ok=True)
    results = json.loads((folder / "metrics.json").read_text())
    assert results["tasks"]["vqa_closed"]["metrics"]["accuracy"] == 0.5
    assert results["tasks"]["rec"]["metrics"]["iou"] == pytest.approx(1.0)
    assert (folder / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert latest_evaluation(tmp_path / "run") == folder / "metrics-2.json"
    assert latest_evaluation(tmp_path) is None
    rows = evaluation_rows(results)
    assert ("vqa_closed", 2, "accuracy", 0.5) in rows
    text = format_evaluation(results)
    assert "vqa_closed (2 samples): accuracy 0.500" in text and "rec (1 samples): " in text


def test_format_evaluation_shows_missing_metrics_and_messages():
    results = {"tasks": {"report": {"n": 3, "metrics": {"bleu1": 0.25, "meteor": None}}},
               "messages": ["METEOR not computed: nltk's wordnet data is not on this machine"]}
    assert format_evaluation(results) == ("report (3 samples): bleu1 0.250, meteor n/a\n"
                                          "Note: METEOR not computed: nltk's wordnet data is not on this machine")
    assert format_evaluation({"tasks": {}}) == "No predictions were evaluated."


def test_finished_model_and_merge_command(tmp_path):
    assert finished_model(tmp_path) is None
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert finished_model(tmp_path) == "adapter"
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    assert finished_model(tmp_path) == "merged"
    assert merge_command("py", tmp_path) == ["py", "-m", "M3DAssistantLib.cli", "merge", str(tmp_path),
                                             str(tmp_path / "merged")]
    from M3DAssistantLib.cli import build_parser

    args = build_parser().parse_args(merge_command("py", tmp_path)[3:])  # the CLI knows this command
    assert (args.adapter, args.output) == (str(tmp_path), str(tmp_path / "merged"))


# ----------------------------------------------------------------------------------------------------------------------
# MRML (slicer-core)


def _rows(table_node, column):
    array = table_node.GetTable().GetColumn(column)
    return [array.GetValue(r) for r in range(table_node.GetNumberOfRows())]


def test_loss_curve_nodes_are_ours_unique_and_reused(headless_slicer, tmp_path):
    scene, _ = headless_slicer
    folder = tmp_path / "run"
    # the user's nodes with the names ours would get: never reused, never changed
    user_table = scene.AddNewNodeByClass("vtkMRMLTableNode", "M3D training loss (run)")
    user_chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "M3D training loss (run)")
    nodes = loss_curve_nodes(scene, folder)
    assert nodes.table is not user_table and nodes.chart is not user_chart
    assert nodes.table.GetName() != user_table.GetName() and nodes.table.GetName().startswith("M3D training loss (run)")
    for node, role in ((nodes.table, "lossTable"), (nodes.series, "lossSeries"), (nodes.chart, "lossChart")):
        assert node.GetAttribute(ROLE_ATTRIBUTE) == role
        assert node.GetAttribute(FOLDER_ATTRIBUTE) == str(folder)
    assert nodes.series.GetTableNodeID() == nodes.table.GetID()
    assert (nodes.series.GetXColumnName(), nodes.series.GetYColumnName()) == ("step", "loss")
    assert nodes.chart.GetNumberOfPlotSeriesNodes() == 1 and nodes.chart.GetPlotSeriesNodeID() == nodes.series.GetID()
    assert (nodes.chart.GetXAxisTitle(), nodes.chart.GetYAxisTitle()) == ("optimizer step", "loss")

    curve = LossCurve()
    curve.add([{"stage": "train", "step": s, "loss": 1.0 / s, "lr": 1e-4 * s} for s in (1, 2, 3)])
    modified = []
    tag = nodes.table.AddObserver("ModifiedEvent", lambda *args: modified.append(1))
    fill_loss_table(nodes.table, curve)
    nodes.table.RemoveObserver(tag)
    assert len(modified) == 1  # one redraw per poll
    assert _rows(nodes.table, 0) == [1, 2, 3]
    assert _rows(nodes.table, 1) == pytest.approx([1.0, 0.5, 1 / 3], rel=1e-5)
    assert _rows(nodes.table, 2) == pytest.approx([1e-4, 2e-4, 3e-4])

    # a resumed run: fewer rows, then more
    curve.add([{"stage": "start", "step": 1}, {"stage": "train", "step": 2, "loss": 0.25}])
    fill_loss_table(nodes.table, curve)
    assert _rows(nodes.table, 1) == pytest.approx([1.0, 0.25])
    assert nodes.table.GetAttribute(ROLE_ATTRIBUTE) == "lossTable"

    again = loss_curve_nodes(scene, folder)
    assert (again.table, again.series, again.chart) == (nodes.table, nodes.series, nodes.chart)
    assert find_loss_curve_nodes(scene, folder).table is nodes.table
    other = loss_curve_nodes(scene, tmp_path / "run2")
    assert other.table is not nodes.table and other.chart.GetPlotSeriesNodeID() == other.series.GetID()
    # a deleted series is recreated, the table is kept
    scene.RemoveNode(nodes.series)
    repaired = loss_curve_nodes(scene, folder)
    assert repaired.table is nodes.table and repaired.series is not None
    assert repaired.chart.HasPlotSeriesNodeID(repaired.series.GetID())
    assert user_table.GetNumberOfRows() == 0 and user_table.GetAttribute(ROLE_ATTRIBUTE) is None
    assert user_chart.GetNumberOfPlotSeriesNodes() == 0
    assert find_loss_curve_nodes(scene, tmp_path / "never") is None


def test_evaluation_table_node(headless_slicer, tmp_path):
    scene, _ = headless_slicer
    results = {"tasks": {"vqa_closed": {"n": 4, "metrics": {"accuracy": 0.75}},
                         "report": {"n": 2, "metrics": {"bleu1": 0.5, "meteor": None}}}}
    node = evaluation_table_node(scene, results, tmp_path / "metrics.json")
    assert node.GetName() == "M3D evaluation (metrics)" and node.GetNumberOfRows() == 3
    assert [node.GetCellText(r, 0) for r in range(3)] == ["vqa_closed", "report", "report"]
    assert [node.GetCellText(r, 2) for r in range(3)] == ["accuracy", "bleu1", "meteor"]
    assert node.GetCellText(0, 1) == "4" and float(node.GetCellText(0, 3)) == 0.75
    assert math.isnan(float(node.GetCellText(2, 3)))
    assert evaluation_table_node(scene, results, tmp_path / "metrics.json") is node  # the same file: same node
    assert evaluation_table_node(scene, results, tmp_path / "metrics-2.json") is not node


# ----------------------------------------------------------------------------------------------------------------------
# M3DTraining.py under the test harness (with the slicer-core scene)


@pytest.fixture
def training(slicer_harness):
    """M3DTraining.py loaded under the test harness (``Testing/helpers/slicer_harness``: real Qt, the slicer-core scene,
    Slicer's own ``slicer.util``), with M3D Assistant loaded beside it: "Use in M3D Assistant" reaches its logic
    through ``slicer.util.getModuleLogic`` as in Slicer (``assistant_logic()``)."""
    import slicer

    module = slicer_harness.loadModule("M3DTraining")
    slicer_harness.loadModule("M3DAssistant")
    module.assistant_logic = lambda: slicer.util.getModuleLogic("M3DAssistant")
    return module


def _logic(training, **settings):
    return training.M3DTrainingLogic(settings=MemorySettings(settings))


def test_parameter_node_and_ui_cover_the_panel(training):
    fields = parameter_node_fields("M3DTraining")
    for name in ("exportSource", "sceneFiles", "validationFraction", "datasetFolder", "baseModel", "preset", "stage",
                 *TASK_PARAMETERS, *PRESET_PARAMETERS, "maxSteps", "saveSteps", "seed", "deepspeed", "gpus",
                 "outputFolder"):
        assert name in fields, name
    assert fields["preset"] == "Annotated[str, Choice(list(PRESET_CHOICES))]"
    _, widgets = ui_widgets("M3DTraining")
    bound = {w.findtext("property[@name='SlicerParameterName']/string") for w in widgets.values()}
    assert set(fields) - bound == {"gpus"}  # the GPU list is a checkable list, synchronised by the widget
    p = _logic(training).getParameterNode()
    defaults = PanelState()
    assert PanelState.from_parameter_node(p) == PanelState(gpus=())
    assert (p.batchSize, p.learningRate, p.saveSteps, p.seed) == (defaults.batch_size, defaults.learning_rate,
                                                                  defaults.save_steps, defaults.seed)
    assert p.preset == PRESET_ONE_GPU and p.stage == STAGE_LORA and p.deepspeed == DEEPSPEED_OFF


def test_module_self_tests(training):
    run_slicer_self_test(training.M3DTrainingTest, "test_ParameterNode", "test_TrainConfig",
                          "test_ProgressAndLossCurve", "test_UseInAssistant")
    assert training.assistant_logic().getParameterNode().modelChoice == "Fine-tuned model (M3DTraining output)"


def test_panel_helpers_stay_light():
    """What the module imports at start-up and when polling pulls in no torch, transformers, peft or accelerate."""
    import subprocess

    # every module of the package but the dataset, which the trainer imports in its own process
    code = ("import importlib, pkgutil, sys, M3DTrainingLib\n"
            "names = [m.name for m in pkgutil.iter_modules(M3DTrainingLib.__path__) if m.name != 'data']\n"
            "for name in names: importlib.import_module('M3DTrainingLib.' + name)\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate', 'monai') if m in sys.modules]\n"
            "print(len(names), heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **helper_environment()})
    assert done.returncode == 0, done.stdout + done.stderr
    count, heavy = done.stdout.split(maxsplit=1)
    assert int(count) >= 19 and heavy.strip() == "[]", done.stdout




def _dataset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"format": "m3d-slicer-dataset", "version": 1,
                                                     "seg": {"train": [{"image": "a"}], "validation": []},
                                                     "report": {"train": [{"image": "a"}], "validation": []}}))
    return folder


@POSIX_ONLY
def test_logic_runs_watches_reconnects_cancels_and_resumes_a_job(training, tmp_path):
    pytest.importorskip("psutil")
    fake = _script(tmp_path / "fake-python", FAKE_TRAINING_PYTHON.format(python=sys.executable))
    logic = _logic(training, pythonExecutable=fake)
    p = logic.getParameterNode()
    p.datasetFolder = _dataset(tmp_path / "dataset")
    output = tmp_path / "run"
    p.outputFolder = output
    logic.setSelectedGpus([])
    assert logic.jobState() is None and logic.statusText() == "No training job in the output folder."
    output.mkdir()
    (output / "hold").write_text("")  # the fake trainer waits after step 3

    job = logic.startTraining()
    assert job.output_dir == output and logic.jobState() == "running"
    assert json.loads(logic.settings.get("recentJobs")) == [str(output)]
    deadline = time.monotonic() + 30
    while len(logic.lossCurve) < 3 and time.monotonic() < deadline:
        logic.poll()
        time.sleep(0.05)
    assert logic.lossCurve.steps == [1, 2, 3] and logic.jobState() == "running"
    assert logic.lossNodes.table.GetNumberOfRows() == 3
    assert "Running (process" in logic.statusText() and "loss 3.3333" in logic.statusText()
    assert logic.progressFraction() == pytest.approx(0.5)
    env = json.loads((output / "env.json").read_text())
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert str(REPO / "M3DTraining") in env["PYTHONPATH"].split(os.pathsep)

    # Slicer restarts: a new Logic with a new scene parameter (no output folder) finds the running job
    reopened = _logic(training, pythonExecutable=fake, recentJobs=logic.settings.get("recentJobs"))
    reopened_p = reopened.getParameterNode()
    reopened_p.outputFolder = Path()
    assert reopened.jobFolderToShow(reopened_p) == str(output)
    reopened.attachJob(output)
    assert reopened.jobState() == "running" and reopened.lossCurve.steps == [1, 2, 3]
    assert reopened.lossNodes.table is logic.lossNodes.table  # the same nodes, found by their attributes

    status = reopened.cancelTraining()
    assert status.state == "cancelled" and reopened.jobState() == "cancelled" and reopened.canResume()
    assert "Cancelled: cancelled by the user" in reopened.statusText()
    (output / "hold").unlink()
    reopened.resumeTraining()
    assert reopened.jobState() == "running"
    final = reopened.waitForTraining(timeout=60, interval=0.05)
    assert final.state == "completed" and reopened.jobState() == "completed" and not reopened.canResume()
    assert reopened.lossCurve.steps == [1, 2, 3, 4, 5, 6]  # step 3 was trained again after the checkpoint at 2
    assert _rows(reopened.lossNodes.table, 1) == pytest.approx([10.0 / s for s in range(1, 7)])
    assert reopened.progressFraction() == 1.0 and "Completed: finished 6 steps" in reopened.statusText()
    # nothing runs any more: the next opening shows no job unless its folder is chosen
    assert reopened.jobFolderToShow(reopened_p) == ""

    assert reopened.finishedModel(output) == "adapter"
    parameters = reopened.useInAssistant(output)
    assert parameters.parameterNode is training.assistant_logic().getParameterNode().parameterNode
    assert (parameters.modelChoice, parameters.modelSource) == ("Fine-tuned model (M3DTraining output)", str(output))


@POSIX_ONLY
def test_logic_gpus_memory_estimate_and_warnings(training, tmp_path):
    smi = _script(tmp_path / "nvidia-smi", f"#!/bin/sh\nprintf '{NVIDIA_SMI_SAMPLE}'\n")
    estimate = _script(tmp_path / "python", "#!/bin/sh\necho 'Memory estimate per device (bf16):'\n"
                                            "echo '  total          30.00 GiB'\n")
    logic = _logic(training, pythonExecutable=estimate)
    p = logic.getParameterNode()
    assert logic.memoryReport(p)[0] == []  # GPUs not detected yet: no warning
    result = logic.detectGpus(nvidiaSmi=smi)
    assert [g.index for g in result.gpus] == [0, 1] and p.gpus == "0"  # first detection: the first GPU
    warnings, note = logic.memoryReport()
    assert warnings == [] and "about 9.5 GiB" in note
    logic.applyPreset("official")
    assert p.preset == PRESET_OFFICIAL and p.batchSize == 8
    (warning,) = logic.memoryReport()[0]
    assert warning.startswith("GPU 0 (NVIDIA GeForce RTX 4090) has 24.0 GiB")
    logic.setSelectedGpus([1])
    assert logic.memoryReport()[0] == []  # 48 GB
    text = logic.estimateMemory()  # the fake prints 30 GB for these settings
    assert "total          30.00 GiB" in text
    warnings, note = logic.memoryReport()
    assert warnings == [] and "about 30.0 GiB (estimated for these settings)" in note
    logic.setSelectedGpus([0, 1])
    assert len(logic.memoryReport()[0]) == 1
    # a second detection keeps the user's choice
    logic.detectGpus(nvidiaSmi=smi)
    assert p.gpus == "0,1"
    logic.setSelectedGpus([])
    assert p.gpus == "cpu" and "runs on the CPU" in logic.memoryReport()[0][0]

    # the non-blocking path: the result comes through poll() and the callback
    got = []
    logic.detectGpus(wait=False, callback=got.append, nvidiaSmi=smi)
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        logic.poll()
        time.sleep(0.02)
    assert got and got[0].source == "nvidia-smi" and not logic.needsPolling()


def test_logic_refuses_what_cannot_work(training, tmp_path, monkeypatch):
    logic = _logic(training, pythonExecutable=sys.executable)
    p = logic.getParameterNode()
    with pytest.raises(ConfigError, match="choose the dataset folder"):
        logic.startTraining()
    p.datasetFolder = tmp_path / "empty"
    p.outputFolder = tmp_path / "run"
    with pytest.raises(InputError, match="no dataset.json"):
        logic.startTraining()
    p.datasetFolder = _dataset(tmp_path / "ds")
    for name in TASK_PARAMETERS:
        setattr(p, name, name == "taskRec")
    with pytest.raises(InputError, match=r"no training samples for the chosen tasks \(rec\)"):
        logic.startTraining()
    p.taskSeg = True
    with pytest.raises(M3DError, match="Choose the GPUs first"):  # not detected yet: never the CPU by accident
        logic.startTraining()
    logic.setSelectedGpus([])
    monkeypatch.setattr(requirements, "TRAINING_MODULES", ("json", "no_such_trainer_module"))
    with pytest.raises(M3DError, match="lacks no_such_trainer_module"):
        logic.startTraining()
    assert not (tmp_path / "run").exists()  # nothing was started or written
    with pytest.raises(M3DError, match="holds no finished training"):
        logic.useInAssistant(tmp_path)
    with pytest.raises(M3DError, match="no fine-tuned adapter to merge"):
        logic.mergeModel(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        logic.evaluatePredictions(tmp_path / "missing.json")
    with pytest.raises(M3DError, match="No training job to cancel"):
        logic.cancelTraining()
    p.exportSource = SOURCE_SCENE_FILES
    p.datasetFolder = tmp_path / "new-ds"
    with pytest.raises(InputError, match="Add the scene files"):
        logic.exportDataset()
    p.sceneFiles = str(tmp_path / "absent.mrb")
    with pytest.raises(InputError, match="do not exist"):
        logic.exportDataset()


def test_use_in_assistant_without_the_module(training, tmp_path, monkeypatch):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")

    def absent(name):
        raise RuntimeError(f"Could not find module widget representation with name '{name}'")

    monkeypatch.setattr(sys.modules["slicer.util"], "getModuleLogic", absent, raising=False)
    monkeypatch.setitem(sys.modules, "M3DAssistant", None)  # import M3DAssistant -> ImportError
    with pytest.raises(M3DError, match="M3D Assistant module is not available"):
        _logic(training).useInAssistant(tmp_path)


def test_logic_exports_the_current_scene_and_evaluates(training, slicer_harness, tmp_path, ct_path):
    """Export of the live scene through the Logic (report + segment), then an evaluation through the helper."""
    pytest.importorskip("matplotlib")
    import numpy as np
    import slicer as real_slicer

    scene, logics = slicer_harness.scene, slicer_harness.logics
    volume = logics["volumes"].AddArchetypeVolume(str(ct_path), "CT")
    assert volume is not None
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
    mask = np.zeros(volume.GetImageData().GetDimensions()[::-1], np.uint8)
    mask[tuple(slice(s // 3, 2 * s // 3) for s in mask.shape)] = 1
    real_slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, volume)
    report = scene.AddNewNodeByClass("vtkMRMLTextNode", "CT report")
    report.SetText("A normal abdominal CT.")

    logic = _logic(training, pythonExecutable=sys.executable)
    p = logic.getParameterNode()
    p.datasetFolder = tmp_path / "dataset"
    p.validationFraction = 0.0
    events = []
    result = logic.exportDataset(progress=events.append)
    assert result.counts["seg"]["train"] == 1 and result.counts["report"]["train"] == 1, result.summary()
    assert events and events[-1].fraction == 1.0
    assert "Samples (training + validation): report 1 + 0" in logic.datasetSummary(p.datasetFolder)
    assert logic.folderText(p.outputFolder) == str(tmp_path / "dataset-finetuned")  # suggested next to it
    assert logic.panelState().dataset_folder == str(tmp_path / "dataset")

    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"task": "vqa_closed", "prediction": "B. Spleen", "answer_choice": "B"}]))
    results = logic.evaluatePredictions(predictions, outputFolder=tmp_path / "run")
    assert results["tasks"]["vqa_closed"]["metrics"]["accuracy"] == 1.0
    assert logic.latestEvaluation(tmp_path / "run") == results
    tables = [scene.GetNthNodeByClass(i, "vtkMRMLTableNode") for i in range(scene.GetNumberOfNodesByClass(
        "vtkMRMLTableNode"))]
    assert [t.GetName() for t in tables if t.GetAttribute(ROLE_ATTRIBUTE) == "evaluation"] == [
        "M3D evaluation (metrics)"]


def test_helper_queue_hands_values_and_errors_to_callbacks(caplog):
    class Helper:
        def __init__(self, polls, result):
            self.polls, self.result, self.cancelled = polls, result, False

        def poll(self):
            self.polls -= 1
            return self.result if self.polls <= 0 else None

        def cancel(self):
            self.cancelled = True

    queue = HelperQueue()
    got = []
    queue.add(Helper(1, 2), lambda r: r * 10, got.append)
    queue.add(Helper(2, "x"), lambda r: int(r), got.append)  # finish raises: the callback gets the error
    queue.add(Helper(1, "y"), lambda r: int(r), None)  # no callback: logged
    assert queue
    queue.poll()
    assert got == [20] and queue
    queue.poll()
    assert got[0] == 20 and isinstance(got[1], ValueError) and not queue
    assert "invalid literal" in caplog.text
    pending = Helper(99, None)
    queue.add(pending, lambda r: r, got.append)
    queue.cancel_all()
    assert pending.cancelled and not queue and len(got) == 2
