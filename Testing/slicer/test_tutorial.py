"""docs/tutorial.md kept true: its marked blocks are run, everything else it names is checked against the code.

A block runs when the line before its opening fence is ``<!-- tutorial-test: KIND -->``:

* ``shell`` (bash): all shell blocks run in order as one bash script (``set -euo pipefail``) in a fresh folder that
  stands in for the clone's root (it holds a link to ``Testing/Data``; ``HOME`` is that folder too). ``m3d`` there is
  a small script that hands its arguments, working folder and ``M3D_*`` variables to ``M3DAssistantLib.cli.main`` --
  the function the ``m3d`` entry point calls -- in this test process, so torch is imported once rather than once per
  command (about 10 s each on 2 cores). The outputs are then loaded with slicer-core's readers.
* ``console`` (python): run in order in one namespace, as typed into Slicer's Python console, on a headless
  slicer-core scene holding the sample CT as part 1 loads it (``example_ct_sm``). ``slicer.util.getModuleLogic
  ("M3DAssistant")`` returns the module's real Logic (M3DAssistant.py imported as test_assistant_module's
  ``assistant`` fixture does), with the computer's settings as a user sets them in the panel's Advanced section
  (Worker Python = this Python, M3D-CLIP model = the tiny CLIP).
* ``serve`` (bash): runs with the real ``m3d`` executable beside this Python (``python -m M3DAssistantLib`` if
  there is none); its last line, ``m3d serve ...``, becomes the server process, on 127.0.0.1.
* ``client`` and ``remote-console`` (python): run against that server, the latter through the module's Logic as the
  console blocks.

Stand-ins, each the smallest that keeps the blocks as a user types them:

* The model: the hub id ``GoodBaiBai88/M3D-LaMed-Phi-3-4B`` is replaced by the tiny random checkpoint of the
  ``tiny_phi3`` fixture -- in the text of bash blocks, and for the console as the checkpoint the panel's
  "M3D-LaMed Phi-3 4B (official)" choice resolves to (``OFFICIAL_MODELS``). Nothing is downloaded.
* The answers: random weights never say ``[SEG]``, a box or an option, so in this process (shell and console) each
  task's answer is made to start with a fitting text (``forcing.forced_answer``: a logits processor, as the other CLI
  tests do); parsing, geometry and file and node writing are the product's own. The server's answers are not forced.
* The worker: the console's local worker process (tested in test_worker.py) is replaced by the same
  ``InferenceEngine`` in this process, built from the arguments the Logic gives the worker (model, device, CLIP).
* The port: the tutorial's ``--port 8765`` becomes ``--port 0`` (the OS picks a free port; the ready line says which)
  and ``127.0.0.1:8765`` in the client blocks becomes that port.

Also checked, for every block whether it runs or not: every ``m3d`` command line parses with the real parser, every
``--flag`` in inline code is an option of ``m3d``, every console call names a real Logic / client / ``slicer.util``
method with keywords it takes, every parameter set has a value the panel offers; and every **bold** text is a text of
the M3DAssistant user interface (bold is reserved for those).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import io
import json
import os
import queue
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from repo_paths import REPO

from M3DAssistantLib import AI_LABEL
from M3DAssistantLib.settings import MemorySettings

TUTORIAL = REPO / "docs" / "tutorial.md"
UI_FILE = REPO / "M3DAssistant" / "Resources" / "UI" / "M3DAssistant.ui"
MODULE_FILE = REPO / "M3DAssistant" / "M3DAssistant.py"

HUB_MODEL = "GoodBaiBai88/M3D-LaMed-Phi-3-4B"
TUTORIAL_PORT = 8765
LANGUAGES = {"shell": "bash", "serve": "bash", "console": "python", "client": "python", "remote-console": "python"}
SERVER_START_TIMEOUT = 180.0

# What each task's answer starts with in this process (random weights never give a box, [SEG] or an option).
FORCED_ANSWERS = {
    "report": " The liver, spleen and kidneys are unremarkable.",
    "ask": " No.",
    "choose": " B. Coronal",
    "locate": " Coordinates are <bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end>.",
    "describe_region": " The liver.",
    "segment": " It is [SEG].",
    "segment_expression": " It is [SEG].",
}


# ---------------------------------------------------------------------------------------------------------------------
# the tutorial's blocks
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    kind: str | None  # the tutorial-test marker, None for a block that is only checked
    language: str
    text: str
    line: int  # 1-based line of the first line of code


def tutorial_blocks() -> list[Block]:
    lines = TUTORIAL.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        marker = re.fullmatch(r"<!-- tutorial-test: ([a-z-]+) -->", lines[i - 1].strip()) if i else None
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(marker.group(1) if marker else None, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                            i + 2))
        i = end + 1
    return blocks


def blocks_of(kind: str) -> list[Block]:
    return [b for b in tutorial_blocks() if b.kind == kind]


def with_model(text: str, model: Path) -> str:
    return text.replace(HUB_MODEL, str(model))


def run_python_block(block: Block, namespace: dict, replacements: dict[str, str] | None = None) -> str:
    """Exec a block as typed (line numbers in tracebacks are the tutorial's); returns what it printed."""
    code = block.text
    for old, new in (replacements or {}).items():
        code = code.replace(old, new)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile("\n" * (block.line - 1) + code, str(TUTORIAL), "exec"), namespace)  # noqa: S102  (the point)
    return printed.getvalue()


def test_marked_blocks_are_well_formed():
    text = TUTORIAL.read_text(encoding="utf-8")
    blocks = tutorial_blocks()
    marked = [b for b in blocks if b.kind]
    assert len(re.findall(r"<!-- tutorial-test: ", text)) == len(marked)  # each marker sits right above its block
    for block in marked:
        assert block.kind in LANGUAGES, f"unknown marker {block.kind!r} at docs/tutorial.md:{block.line}"
        assert block.language == LANGUAGES[block.kind], f"docs/tutorial.md:{block.line}"
    counts = {kind: len(blocks_of(kind)) for kind in LANGUAGES}
    assert counts["serve"] == 1 and min(counts.values()) >= 1, counts
    for block in blocks:
        if block.language == "python":
            ast.parse(block.text)  # every snippet is valid Python, run or not
    shell = "".join(b.text for b in blocks_of("shell"))
    for command in ("inspect", "make-test-checkpoint", "report", "ask", "choose", "locate", "describe", "segment",
                    "segment-expression", "batch"):
        assert re.search(rf"^m3d {command} ", shell, re.MULTILINE), f"no runnable 'm3d {command}' in the tutorial"
    assert HUB_MODEL in shell and HUB_MODEL in blocks_of("serve")[0].text


# ---------------------------------------------------------------------------------------------------------------------
# checks of what cannot run here
# ---------------------------------------------------------------------------------------------------------------------


def _command_lines(script: str) -> list[list[str]]:
    """The simple commands of a bash block as argument lists (comments dropped, continuations joined)."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in words + [";"]:
            if word in (";", "&&", "||", "|", "&"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def _m3d_arguments(command: list[str]) -> list[str] | None:
    """The arguments given to m3d by a command line (``m3d ...``, ``.venv/bin/m3d ...``, ``-m M3DAssistantLib ...``)."""
    if Path(command[0]).name == "m3d":
        return command[1:]
    if "-m" in command:
        i = command.index("-m")
        if i + 1 < len(command) and command[i + 1] in ("M3DAssistantLib", "M3DAssistantLib.cli"):
            return command[i + 2:]
    return None


def test_every_m3d_command_line_parses():
    from M3DAssistantLib import cli

    parser = cli.build_parser()
    seen = 0
    for block in tutorial_blocks():
        if block.language != "bash":
            continue
        for command in _command_lines(block.text):
            arguments = _m3d_arguments(command)
            if arguments is None:
                continue
            seen += 1
            errors = io.StringIO()
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                try:
                    parser.parse_args(arguments)
                except SystemExit as e:
                    assert e.code == 0 and arguments == ["--help"], (
                        f"docs/tutorial.md:{block.line}: {shlex.join(command)}\n{errors.getvalue()}")
    assert seen >= 15


def test_every_flag_in_the_prose_is_an_m3d_option():
    from M3DAssistantLib import cli

    options = set()
    parsers = [cli.build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:  # argparse keeps no public list of a parser's options
            options.update(action.option_strings)
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                parsers.extend(action.choices.values())
    text = re.sub(r"```.*?```", "", TUTORIAL.read_text(encoding="utf-8"), flags=re.DOTALL)
    not_ours = {"--local-dir"}  # hf download's
    flags = {flag for span in re.findall(r"`([^`]+)`", text) for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", span)}
    assert flags and flags - not_ours <= options, sorted(flags - not_ours - options)


def _parameter_choices(module) -> dict[str, list[str] | None]:
    """Parameter node fields -> the values the panel offers (None: free)."""
    fields = {}
    for name, annotation in module.M3DAssistantParameterNode.__annotations__.items():
        metadata = getattr(annotation, "__metadata__", ())
        fields[name] = next((list(m.choices) for m in metadata if hasattr(m, "choices")), None)
    return fields


def test_every_console_call_is_real(assistant):  # noqa: F811
    import slicer

    from M3DAssistantLib.panel import TaskRequest
    from M3DAssistantLib.serving.client import M3DClient

    task_options = {"window", "roiNode", "maxNewTokens"}  # the Logic's **options (see _taskOptions)
    receivers = {"logic": assistant.M3DAssistantLogic, "client": M3DClient, "request": TaskRequest}
    logic = assistant.M3DAssistantLogic(settings=MemorySettings())
    fields = _parameter_choices(assistant)
    checked = 0
    for block in tutorial_blocks():
        if block.language != "python":
            continue
        where = f"docs/tutorial.md:{block.line}"
        for node in ast.walk(ast.parse(block.text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner, name = node.func.value, node.func.attr
                if isinstance(owner, ast.Name) and owner.id in receivers:
                    method = getattr(receivers[owner.id], name, None)
                    assert callable(method), f"{where}: {owner.id}.{name} does not exist"
                    signature = inspect.signature(method)
                    keywords = {k.arg for k in node.keywords}
                    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
                    named = {k for k in keywords if k in signature.parameters}
                    assert not takes_any or keywords - named <= task_options, f"{where}: {owner.id}.{name}({keywords})"
                    signature.bind(None, *([None] * len(node.args)), **{k: None for k in (keywords if not takes_any
                                                                                          else named)})
                    checked += 1
                elif ast.unparse(owner) == "slicer.util":
                    assert callable(getattr(slicer.util, name, None)), f"{where}: slicer.util.{name} does not exist"
                    checked += 1
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
                target = node.targets[0]
                owner = ast.unparse(target.value)
                if owner == "parameters":
                    assert target.attr in fields, f"{where}: the parameter node has no {target.attr}"
                    if fields[target.attr] is not None and isinstance(node.value, ast.Constant):
                        assert node.value.value in fields[target.attr], f"{where}: {ast.unparse(node)}"
                    checked += 1
                elif owner == "logic":
                    assert hasattr(logic, target.attr), f"{where}: the Logic has no {target.attr}"
    # choices named in the prose: parameters.modelChoice = "..." and friends
    text = TUTORIAL.read_text(encoding="utf-8")
    for name, value in re.findall(r"parameters\.(\w+) = \"([^\"]+)\"", text):
        assert name in fields and (fields[name] is None or value in fields[name]), f"parameters.{name} = {value!r}"
    assert checked >= 30


def _ui_texts(module) -> set[str]:
    texts = set()
    for prop in ET.parse(UI_FILE).iter("property"):
        if prop.get("name") in ("text", "title", "noneDisplay", "placeholderText"):
            texts.add(prop.findtext("string") or "")
    texts |= set(re.findall(r'\b_\("([^"]+)"\)', MODULE_FILE.read_text(encoding="utf-8")))
    texts |= set(module.MODEL_CHOICES) | set(module.RUN_CHOICES) | set(module.WINDOW_CHOICES)
    import slicer

    parent = slicer.app.moduleManager().module("M3DAssistant")  # the module's parent, as the harness loaded it
    return texts | set(parent.categories) | {parent.title}


def test_bold_names_are_texts_of_the_panel(assistant):  # noqa: F811
    texts = _ui_texts(assistant)
    bold = [" ".join(b.split()) for b in re.findall(r"\*\*(.+?)\*\*", TUTORIAL.read_text(encoding="utf-8"), re.DOTALL)]
    assert len(bold) > 50
    for name in bold:
        for part in name.split(" › "):
            assert part in texts, f"**{name}** in docs/tutorial.md: {part!r} is not a text of the M3DAssistant panel"


# ---------------------------------------------------------------------------------------------------------------------
# running the shell part
# ---------------------------------------------------------------------------------------------------------------------


class ForcedAnswers:
    """An engine whose task methods' answers start with FORCED_ANSWERS[task]; everything else is the engine's."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._engine, name)
        if name not in FORCED_ANSWERS:
            return attribute
        from forcing import forced_answer

        @functools.wraps(attribute)
        def forced(*args, **kwargs):
            with forced_answer(self._engine, FORCED_ANSWERS[name]):
                return attribute(*args, **kwargs)

        return forced

    def run_batch(self, requests, *, sampling=None, batch_size: int = 8) -> list:
        """``m3d batch``'s decoding, one request at a time (each forced as its task's answer), through the engine's
        own batched path."""
        from forcing import forced_answer

        results = []
        for request in requests:
            with forced_answer(self._engine, FORCED_ANSWERS[request.method]):
                results += self._engine.run_batch([request], sampling=sampling, batch_size=1)
        return results


SHIM = """#!{python} -S
import json, os, socket, sys
request = {{"argv": sys.argv[1:], "cwd": os.getcwd(),
            "env": {{k: v for k, v in os.environ.items() if k.startswith("M3D_") or k == "HOME"}}}}
with socket.socket(socket.AF_UNIX) as s:
    s.connect({address!r})
    s.sendall(json.dumps(request).encode() + b"\\n")
    reply = json.loads(s.makefile("rb").readline())
sys.stdout.write(reply["stdout"])
sys.stdout.flush()
sys.stderr.write(reply["stderr"])
sys.exit(reply["rc"])
"""


class InProcessM3D:
    """``m3d`` for the shell blocks: a script on PATH that runs ``cli.main(argv)`` in this process (one at a time)."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="m3d-tutorial-"))  # short: a socket path has ~100 characters
        self.bin = self.folder / "bin"
        self.bin.mkdir()
        self.address = str(self.folder / "m3d.sock")
        script = self.bin / "m3d"
        script.write_text(SHIM.format(python=sys.executable, address=self.address))
        script.chmod(0o755)
        self.calls: list[list[str]] = []
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(self.address)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, name="m3d-in-process", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            with connection:
                request = json.loads(connection.makefile("rb").readline())
                reply = self._run(**request)
                connection.sendall(json.dumps(reply).encode() + b"\n")

    def _run(self, argv: list[str], cwd: str, env: dict[str, str]) -> dict[str, Any]:
        from M3DAssistantLib import cli

        self.calls.append(argv)
        saved_cwd = os.getcwd()
        names = {k for k in os.environ if k.startswith("M3D_")} | set(env) | {"HOME"}
        saved_env = {k: os.environ.get(k) for k in names}
        out, err = io.StringIO(), io.StringIO()
        try:
            os.chdir(cwd)
            for k in names:
                os.environ.pop(k, None)
            os.environ.update(env)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = cli.main(argv)
                except SystemExit as e:  # argparse
                    rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                except BaseException:  # noqa: BLE001  (reported to the script, which then fails)
                    import traceback

                    traceback.print_exc()
                    rc = 1
        finally:
            os.chdir(saved_cwd)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}

    def close(self) -> None:
        self._listener.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh folder standing in for the clone's root: Testing/Data links to the real test data."""
    folder = tmp_path_factory.mktemp("tutorial")
    (folder / "Testing").mkdir()
    (folder / "Testing" / "Data").symlink_to(REPO / "Testing" / "Data", target_is_directory=True)
    return folder


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def run_shell_part(clone: Path, model: Path, monkeypatch, forced: bool) -> tuple[subprocess.CompletedProcess, list]:
    """Every shell block, in order, as one bash script in ``clone``; ``forced``: answers start as FORCED_ANSWERS."""
    from M3DAssistantLib import cli

    if forced:
        monkeypatch.setattr(cli, "_engine", lambda args, bar, make=cli._engine: ForcedAnswers(make(args, bar)))
    script = "set -euxo pipefail\n" + "".join(with_model(b.text, model) for b in blocks_of("shell"))
    env = dict(os.environ, HOME=str(clone))
    for name in [k for k in env if k.startswith("M3D_")]:
        del env[name]
    m3d = InProcessM3D()
    try:
        env["PATH"] = os.pathsep.join([str(m3d.bin), str(_venv_bin()), env.get("PATH", "")])
        result = subprocess.run(["bash", "-c", script], check=False, cwd=clone, env=env, capture_output=True, text=True,
                                timeout=600)
    finally:
        m3d.close()
    log = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert result.returncode == 0, log
    assert [call[0] for call in m3d.calls][:2] == ["inspect", "make-test-checkpoint"], m3d.calls
    return result, m3d.calls


def _check_training_part(clone: Path) -> None:
    """Part 4: the sample scene exported, trained for two steps and merged into a checkpoint that loads."""
    manifest = json.loads((clone / "dataset-tiny" / "dataset.json").read_text())
    assert manifest["model_shape"] == [16, 64, 64] and manifest["seg"]["train"]
    steps = [json.loads(line) for line in (clone / "runs" / "tiny" / "progress.jsonl").read_text().splitlines()]
    assert any(event.get("loss") is not None for event in steps)
    assert (clone / "runs" / "tiny" / "merged" / "config.json").is_file()


def test_shell_part_unforced(tmp_path_factory, tiny_phi3, headless_slicer, monkeypatch):
    """The shell part exactly as a user runs it with the tiny random model: no box, no mask (usually), and every
    command still succeeds; the files the tutorial promises unconditionally are there."""
    clone = tmp_path_factory.mktemp("tutorial-unforced")
    (clone / "Testing").mkdir()
    (clone / "Testing" / "Data").symlink_to(REPO / "Testing" / "Data", target_is_directory=True)
    result, _calls = run_shell_part(clone, tiny_phi3, monkeypatch, forced=False)
    out = clone / "out"
    assert (out / "report.txt").read_text().rstrip().endswith(f"[{AI_LABEL}]")
    assert json.loads((out / "report.json").read_text())["provenance"]["label"] == AI_LABEL
    if not (out / "liver.mrk.json").exists():  # what the tutorial says happens then
        assert "no box to write to out/liver.mrk.json" in result.stderr
    for volume in ("example_ct_sm.nii.gz", "example_ct_dicom"):
        results = json.loads((out / "batch" / volume / "results.json").read_text())
        assert set(results["tasks"].values()) == {"report", "segment:liver"}
    assert result.stderr.count("done before, skipped") == 2
    assert (out / "batch" / "cohort.csv").read_text().count("\n") == 1 + 2 * 2  # header + 2 volumes x 2 tasks
    _check_training_part(clone)
    # .gitignore covers everything the tutorial creates in a clone
    created = sorted(p.name + ("/" if p.is_dir() else "") for p in clone.iterdir()
                     if p.name != "Testing" and not p.name.startswith("."))  # dot folders: HOME is the clone here
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *created], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert created and sorted(ignored) == created, set(created) - set(ignored)


def test_shell_part(clone, tiny_phi3, headless_slicer, monkeypatch, tutorial_server):
    import slicer

    result, _calls = run_shell_part(clone, tiny_phi3, monkeypatch, forced=True)

    # 3.1: the hub id's stand-in and the tiny checkpoint the tutorial writes
    assert "will load      yes" in result.stdout and (clone / "m3d-tiny" / "config.json").is_file()
    # 3.2: the answers and the files
    out = clone / "out"
    report = (out / "report.txt").read_text()
    assert report.startswith(FORCED_ANSWERS["report"].strip()) and report.rstrip().endswith(f"[{AI_LABEL}]")
    assert "choice: B. Coronal" in result.stderr
    full = json.loads((out / "report.json").read_text())
    assert full["task"] == "report" and full["provenance"]["label"] == AI_LABEL
    assert full["provenance"]["model"] == str(tiny_phi3) and full["provenance"]["intensity"]

    # 3.3: the files open in Slicer (slicer-core's readers) and line up with the CT as Slicer loads it
    scene, logics = headless_slicer
    ct = logics["volumes"].AddArchetypeVolume(str(clone / "Testing/Data/totalsegmentator/example_ct_sm.nii.gz"),
                                              "example_ct_sm")
    shape = slicer.util.arrayFromVolume(ct).shape
    box = scene.GetNodeByID(logics["markups"].LoadMarkups(str(out / "liver.mrk.json")))
    assert box.IsA("vtkMRMLMarkupsROINode") and box.GetName() == "liver" and min(box.GetSize()) > 0
    for name, target in (("liver.seg.nrrd", "liver"), ("cyst.seg.nrrd", "the cyst in the right kidney")):
        segmentation = logics["segmentations"].LoadSegmentationFromFile(str(out / name), False)
        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(target)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, ct)
        assert mask.shape == shape and mask.any(), name

    assert (out / "liver.nii.gz").is_file()
    # 3.4: batch, one folder per volume (named after the volume's file or folder), resumed, one cohort table
    for volume in ("example_ct_sm.nii.gz", "example_ct_dicom"):
        folder = out / "batch" / volume
        results = json.loads((folder / "results.json").read_text())
        assert set(results["results"]) == {"report", "segment_liver"} and results["label"] == AI_LABEL
        assert (folder / "report.txt").is_file() and (folder / "segment_liver.seg.nrrd").is_file()
    assert result.stderr.count("done before, skipped") == 2
    assert (out / "batch" / "cohort.csv").read_text().count("\n") == 1 + 2 * 2
    _check_training_part(clone)

    # the files the prose names are the ones written
    text = TUTORIAL.read_text(encoding="utf-8")
    for path in set(re.findall(r"`(out/[\w./-]*)`", text)):
        assert (clone / path).exists(), f"docs/tutorial.md names `{path}`, which the shell part did not write"
    batch_files = re.search(r"Each volume gets `out/batch/<volume>/`:(.*?)\n\n", text, re.DOTALL)
    named = re.findall(r"`([\w.-]+\.(?:txt|json|nrrd))`", batch_files.group(1))
    assert named and all((out / "batch" / "example_ct_sm.nii.gz" / name).is_file() for name in named), named


# ---------------------------------------------------------------------------------------------------------------------
# running the console part
# ---------------------------------------------------------------------------------------------------------------------


class InProcessWorker:
    """Stands in for WorkerProcess: keeps what the Logic starts the worker with."""

    def __init__(self, python_executable, model, *, device=None, clip_model=None, env=None, on_message=None,
                 **kwargs):
        self.python_executable, self.model, self.device, self.clip_model = python_executable, model, device, clip_model
        self.pid, self.restarts, self.stopped = os.getpid(), 0, False

    def status_text(self) -> str:
        return f"in this process ({self.model})"

    def stop(self, timeout=None) -> None:
        self.stopped = True


class InProcessWorkerBackend:
    """Stands in for LocalWorkerBackend: the worker's engine (model, device, CLIP as given), in this process; its
    answers forced when ``forced`` (the class attribute the console fixture sets)."""

    forced = True

    def __init__(self, worker):
        from M3DAssistantLib.engine import InferenceEngine

        self.worker = worker
        self.on_progress = None
        engine = InferenceEngine(worker.model, device=worker.device, clip_model=worker.clip_model)
        self._engine = ForcedAnswers(engine) if self.forced else engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def close(self) -> None:
        self.worker.stop()


@pytest.fixture
def console(request, assistant, slicer_harness, tiny_phi3, tiny_clip, monkeypatch, clone):  # noqa: F811
    """A namespace as Slicer's Python console has it, after part 1 loaded the CT; yields (namespace, logic, volume).
    Answers are forced unless the test parametrizes it indirectly with False."""
    import slicer

    from M3DAssistantLib import backends, worker

    monkeypatch.setattr(InProcessWorkerBackend, "forced", getattr(request, "param", True))

    logics = slicer_harness.logics
    volume = logics["volumes"].AddArchetypeVolume(str(REPO / "Testing/Data/totalsegmentator/example_ct_sm.nii.gz"),
                                                  "example_ct_sm")  # File > Add Data names it so
    monkeypatch.setitem(assistant.OFFICIAL_MODELS, assistant.MODEL_PHI3, str(tiny_phi3))
    monkeypatch.setattr(worker, "WorkerProcess", InProcessWorker)
    monkeypatch.setattr(backends, "LocalWorkerBackend", InProcessWorkerBackend)
    settings = MemorySettings({"pythonExecutable": sys.executable, "clipModel": str(tiny_clip)})
    logic = assistant.M3DAssistantLogic(settings=settings)

    def get_module_logic(name):
        if name != "M3DAssistant":
            raise RuntimeError(f"only M3DAssistant stands in here, not {name}")
        return logic

    monkeypatch.setattr(slicer.util, "getModuleLogic", get_module_logic)
    monkeypatch.setenv("HOME", str(clone))
    monkeypatch.chdir(clone)
    yield {"slicer": slicer}, logic, volume
    logic.shutdown()


def _segment_names(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


@pytest.mark.parametrize("console", [False], indirect=True)
def test_console_part_unforced(console, tiny_phi3):
    """The console part exactly as typed, with the tiny model answering as it does (no box or mask, usually): every
    block runs and gives what it promises whatever the answers."""
    from M3DAssistantLib.results import TextResult

    ns, logic, volume = console
    "".join(run_python_block(block, ns) for block in blocks_of("console"))
    assert ns["textNode"] is None or ns["textNode"].GetText().startswith(f"[{AI_LABEL}]")
    assert isinstance(ns["answer"], str) and isinstance(ns["description"], str)
    assert ns["roiNode"] is None or ns["roiNode"].IsA("vtkMRMLMarkupsROINode")
    assert isinstance(ns["result"], TextResult) and ns["result"].provenance.model == str(tiny_phi3)
    assert ns["request"].done()


def test_console_part(console, assistant, tiny_phi3):  # noqa: F811
    import slicer

    from M3DAssistantLib.results import TextResult

    ns, logic, volume = console
    printed = "".join(run_python_block(block, ns) for block in blocks_of("console"))

    # 2.1: the panel's choices; the worker gets the model the official Phi-3 choice stands for here
    parameters = ns["parameters"]
    assert parameters.modelChoice in assistant.MODEL_CHOICES and parameters.runOn in assistant.RUN_CHOICES
    assert parameters.windowPreset in assistant.WINDOW_CHOICES
    assert ns["volume"] is volume and logic.workerProcess().model == str(tiny_phi3)
    # 2.2
    text_node = ns["textNode"]
    assert text_node.IsA("vtkMRMLTextNode") and text_node.GetName() == "example_ct_sm M3D report"
    assert text_node.GetText().startswith(f"[{AI_LABEL}]") and text_node.GetAttribute("M3D.label") == AI_LABEL
    assert "example_ct_sm M3D report" in printed and f"[{AI_LABEL}]" in printed
    assert isinstance(ns["answer"], str) and isinstance(ns["followUp"], str)
    assert ns["choice"] == "Coronal" and "Coronal" in printed
    roi = ns["roiNode"]
    assert roi.IsA("vtkMRMLMarkupsROINode") and roi.GetName() == "liver"
    segmentation = ns["segmentationNode"]
    assert segmentation.IsA("vtkMRMLSegmentationNode")
    assert segmentation.GetName() == "example_ct_sm M3D segmentation"
    assert _segment_names(segmentation) == ["liver", "the cyst in the right kidney"]
    shape = slicer.util.arrayFromVolume(volume).shape
    for segment_id in (segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver"), ns["segmentId"]):
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
        assert mask.shape == shape and mask.any()
    assert ns["description"] == FORCED_ANSWERS["describe_region"].strip()
    ranked = ns["ranked"]
    assert sorted(text for text, _ in ranked) == ["liver cyst", "lung nodule", "normal abdomen"]
    assert [score for _, score in ranked] == sorted((score for _, score in ranked), reverse=True)
    assert [node for node, _ in ns["volumesRanked"]] == [volume]
    # 2.3
    assert ns["croppedReport"].GetName() == "example_ct_sm M3D report (2)"  # nothing overwritten
    assert isinstance(ns["result"], TextResult) and ns["result"].provenance.label == AI_LABEL
    assert ns["result"].provenance.model == str(tiny_phi3)
    assert ns["croppedReport"].GetAttribute("M3D.prompt") == ns["result"].provenance.prompt
    # 2.4
    assert ns["request"].done() and ns["laterNode"].GetName() == "example_ct_sm M3D report (3)"


# ---------------------------------------------------------------------------------------------------------------------
# the server part
# ---------------------------------------------------------------------------------------------------------------------


class TutorialServer:
    """The tutorial's serve block in bash; its last line, ``m3d serve ...``, exec'd as the server (127.0.0.1)."""

    def __init__(self, clone: Path, model: Path):
        from M3DAssistantLib.serving.server import parse_ready_line

        lines = with_model(blocks_of("serve")[0].text, model).strip().splitlines()
        serve = lines[-1]
        assert serve.startswith("m3d serve ") and f"--port {TUTORIAL_PORT}" in serve, serve
        assert "--host" not in serve  # loopback only, here
        serve = serve.replace(f"--port {TUTORIAL_PORT}", "--port 0")
        script = "set -euo pipefail\n" + "\n".join(lines[:-1]) + f"\nexec {serve}\n"
        bin_dir = self._m3d_bin()
        env = dict(os.environ, HOME=str(clone), PYTHONUNBUFFERED="1")
        for name in [k for k in env if k.startswith("M3D_")]:
            del env[name]
        env["PATH"] = os.pathsep.join([str(bin_dir), str(_venv_bin()), env.get("PATH", "")])
        self.stderr_path = clone / "serve.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(["bash", "-c", script], cwd=clone, env=env, stdout=subprocess.PIPE,
                                            stderr=stderr, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(x) for x in self.process.stdout], daemon=True).start()
        self._parse = parse_ready_line
        self._ready: dict | None = None

    @staticmethod
    def _m3d_bin() -> Path:
        """The folder of the real ``m3d`` executable (a script running ``python -m M3DAssistantLib`` if none)."""
        if (_venv_bin() / "m3d").is_file():
            return _venv_bin()
        folder = Path(tempfile.mkdtemp(prefix="m3d-bin-"))
        (folder / "m3d").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m M3DAssistantLib "$@"\n')
        (folder / "m3d").chmod(0o755)
        return folder

    def ready(self) -> dict:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while self._ready is None and time.monotonic() < deadline:
            try:
                self._ready = self._parse(self._lines.get(timeout=0.5).strip())
            except queue.Empty:
                if self.process.poll() is not None:
                    break
        assert self._ready is not None, f"m3d serve did not start:\n{self.stderr_path.read_text()[-3000:]}"
        return self._ready

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module")
def tutorial_server(clone, tiny_phi3):
    """Started first (the shell part asks for it) so that it loads while the shell part runs."""
    server = TutorialServer(clone, tiny_phi3)
    yield server
    server.stop()
    assert "Traceback" not in server.stderr_path.read_text(), server.stderr_path.read_text()[-3000:]


def test_server_part(tutorial_server, console, clone, tiny_phi3):
    from M3DAssistantLib.results import SegmentationResult, TextResult

    ready = tutorial_server.ready()
    assert ready["host"] == "127.0.0.1" and ready["protocol"] == 1
    assert "token" not in ready  # a token the user gave is never printed
    token = (clone / "m3d-token.txt").read_text().strip()
    assert len(token) >= 16
    port = {f"127.0.0.1:{TUTORIAL_PORT}": f"127.0.0.1:{ready['port']}"}

    # 3.6: the Python client
    client_ns: dict = {}
    printed = "".join(run_python_block(block, client_ns, port) for block in blocks_of("client"))
    assert client_ns["client"].info()["model"] == str(tiny_phi3) and str(tiny_phi3) in printed
    assert isinstance(client_ns["report"], TextResult) and AI_LABEL in printed
    assert isinstance(client_ns["liver"], SegmentationResult)

    # 3.7: the module's Logic on the same server
    ns, logic, _volume = console
    printed = "".join(run_python_block(block, ns, port) for block in blocks_of("remote-console"))
    assert type(logic._backend).__name__ == "ClientBackend" and logic.workerProcess() is None
    assert isinstance(ns["answer"], str)
    assert printed.strip() == f"Remote server: http://127.0.0.1:{ready['port']}"
    node = ns["parameters"].parameterNode
    stored = [node.GetParameter(name) for name in node.GetParameterNames()]
    assert stored and not any(token in value for value in stored)  # the token is not in the scene
