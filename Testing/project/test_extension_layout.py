"""The Slicer extension is packaged correctly: CMake metadata and file lists, .ui files, icons, light imports.

No Slicer application is needed. The module files (M3DAssistant.py, M3DTraining.py) are also imported under the test
harness (Testing/helpers/slicer_harness) so that their Module and Logic classes, and parts of their own Slicer
self-tests, run here.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import py_compile
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from module_files import module_source, parameter_node_fields, run_slicer_self_test, ui_widgets
from repo_paths import REPO

MODULES = ("M3DAssistant", "M3DTraining")
UPDATE_SCRIPT = REPO / "Utilities" / "update_cmake_lists.py"
RUN_UPDATE = "Run `python Utilities/update_cmake_lists.py` to regenerate the lists."
HEAVY_PACKAGES = ("torch", "transformers", "peft", "accelerate", "monai", "safetensors", "huggingface_hub")


# --------------------------------------------------------------------------------------------------------------------
# A small CMake reader: commands with their arguments (quoted or not), comments dropped.


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``[(command_name_lowercase, [arguments])]`` of a CMakeLists.txt, in order."""
    text = path.read_text(encoding="utf-8")
    commands: list[tuple[str, list[str]]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        match = re.compile(r"([A-Za-z_]\w*)\s*\(").match(text, i)
        if not match:
            i += 1
            continue
        name, i = match.group(1).lower(), match.end()
        args, token, depth = [], "", 0
        while i < n:
            char = text[i]
            if char == '"':
                end = text.index('"', i + 1)
                token += text[i + 1:end]
                i = end + 1
                continue
            if char == "#":
                i = text.find("\n", i)
                continue
            if char == "(":
                depth += 1
            elif char == ")":
                if depth == 0:
                    break
                depth -= 1
            if char.isspace():
                if token:
                    args.append(token)
                token = ""
            else:
                token += char
            i += 1
        if token:
            args.append(token)
        commands.append((name, args))
        i += 1
    return commands


def cmake_set_values(commands: list[tuple[str, list[str]]]) -> dict[str, list[str]]:
    return {args[0]: args[1:] for name, args in commands if name == "set" and args}


def files_on_disk(module_dir: Path) -> tuple[set[str], set[str]]:
    """(.py files, other files) of a module that must be packaged, independent of the update script's own walk."""
    scripts, resources = set(), set()
    for path in module_dir.rglob("*"):
        relative = path.relative_to(module_dir)
        if not path.is_file() or relative.parts[0] == "Testing" or relative.as_posix() == "CMakeLists.txt":
            continue
        if any(part == "__pycache__" or part.startswith(".") for part in relative.parts):
            continue
        if path.suffix in (".pyc", ".pyo") or path.name.endswith("~"):
            continue
        (scripts if path.suffix == ".py" else resources).add(relative.as_posix())
    return scripts, resources


# --------------------------------------------------------------------------------------------------------------------
# Top-level CMakeLists.txt


def test_top_level_cmake_has_extension_metadata():
    commands = cmake_commands(REPO / "CMakeLists.txt")
    names = [name for name, _ in commands]
    assert names[0] == "cmake_minimum_required"
    assert ("project", ["M3D"]) in commands
    values = cmake_set_values(commands)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert variable in values, f"CMakeLists.txt does not set {variable}"
        assert " ".join(values[variable]).strip(), f"{variable} is empty"
    assert values["EXTENSION_HOMEPAGE"] == ["https://github.com/m3d-slicer/SlicerM3D"]
    assert "PyTorch" in " ".join(values["EXTENSION_DEPENDS"]).split()
    assert "not for clinical use" in values["EXTENSION_DESCRIPTION"][0]
    # The Extensions Manager shows the icon from a raw.githubusercontent URL of a file in this repository.
    (icon_url,) = values["EXTENSION_ICONURL"]
    prefix = "https://raw.githubusercontent.com/m3d-slicer/SlicerM3D/main/"
    assert icon_url.startswith(prefix)
    assert (REPO / icon_url.removeprefix(prefix)).is_file(), f"{icon_url} names a file that is not in the repository"
    screenshots = " ".join(values["EXTENSION_SCREENSHOTURLS"]).split()
    assert screenshots
    for url in screenshots:  # the pictures Utilities/render_panels.py writes
        assert url.startswith(prefix), url
        assert (REPO / url.removeprefix(prefix)).is_file(), f"{url} names a file that is not in the repository"


def test_top_level_cmake_builds_every_module_in_order():
    commands = cmake_commands(REPO / "CMakeLists.txt")
    positions = {}
    for index, (name, args) in enumerate(commands):
        positions.setdefault((name, tuple(args)), index)

    def position(name: str, *args: str) -> int:
        assert (name, args) in positions, f"CMakeLists.txt lacks {name}({' '.join(args)})"
        return positions[(name, args)]

    find_slicer = position("find_package", "Slicer", "REQUIRED")
    use_file = position("include", "${Slicer_USE_FILE}")
    generate_config = position("include", "${Slicer_EXTENSION_GENERATE_CONFIG}")
    cpack = position("include", "${Slicer_EXTENSION_CPACK}")
    subdirectories = [args[0] for name, args in commands if name == "add_subdirectory"]
    assert subdirectories == list(MODULES)
    for module in MODULES:
        assert find_slicer < use_file < position("add_subdirectory", module) < generate_config < cpack
    assert cpack == len(commands) - 1, "include(${Slicer_EXTENSION_CPACK}) must come last"
    # Every folder that builds a scripted module is added (a new module must not be forgotten).
    built = {p.parent.name for p in REPO.glob("*/CMakeLists.txt")
             if "slicerMacroBuildScriptedModule" in p.read_text(encoding="utf-8")}
    assert built == set(MODULES)


# --------------------------------------------------------------------------------------------------------------------
# Module CMakeLists.txt


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_builds_scripted_module_with_generic_tests(module):
    commands = cmake_commands(REPO / module / "CMakeLists.txt")
    assert cmake_set_values(commands)["MODULE_NAME"] == [module]
    (build,) = [args for name, args in commands if name == "slicermacrobuildscriptedmodule"]
    assert build[:2] == ["NAME", "${MODULE_NAME}"]
    assert "WITH_GENERIC_TESTS" in build
    assert build[build.index("SCRIPTS") + 1] == "${MODULE_PYTHON_SCRIPTS}"
    assert build[build.index("RESOURCES") + 1] == "${MODULE_PYTHON_RESOURCES}"
    assert ("slicer_add_python_unittest", ["SCRIPT", "${MODULE_NAME}.py"]) in commands


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_lists_every_file(module):
    module_dir = REPO / module
    values = cmake_set_values(cmake_commands(module_dir / "CMakeLists.txt"))
    expand = lambda names: {name.replace("${MODULE_NAME}", module) for name in names}  # noqa: E731
    listed_scripts = expand(values["MODULE_PYTHON_SCRIPTS"])
    listed_resources = expand(values["MODULE_PYTHON_RESOURCES"])
    scripts, resources = files_on_disk(module_dir)

    assert not scripts - listed_scripts, (
        f"{module}/CMakeLists.txt MODULE_PYTHON_SCRIPTS does not list {sorted(scripts - listed_scripts)}: "
        f"Slicer would not package them. {RUN_UPDATE}")
    assert not resources - listed_resources, (
        f"{module}/CMakeLists.txt MODULE_PYTHON_RESOURCES does not list {sorted(resources - listed_resources)}: "
        f"Slicer would not package them. {RUN_UPDATE}")
    assert not listed_scripts - scripts, (
        f"{module}/CMakeLists.txt lists scripts that do not exist: {sorted(listed_scripts - scripts)}. {RUN_UPDATE}")
    assert not listed_resources - resources, (
        f"{module}/CMakeLists.txt lists resources that do not exist: {sorted(listed_resources - resources)}. "
        f"{RUN_UPDATE}")
    assert f"{module}.py" in listed_scripts and f"{module}Lib/__init__.py" in listed_scripts
    assert {f"Resources/UI/{module}.ui", f"Resources/Icons/{module}.png"} <= listed_resources


def test_update_script_reports_lists_up_to_date():
    result = subprocess.run([sys.executable, str(UPDATE_SCRIPT), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _load_update_script():
    spec = importlib.util.spec_from_file_location("update_cmake_lists", UPDATE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_update_script_regenerates_lists_and_skips_junk(tmp_path, capsys):
    script = _load_update_script()
    module_dir = tmp_path / "Demo"
    for name in ("Demo.py", "DemoLib/__init__.py", "DemoLib/sub/a.py", "Resources/Icons/Demo.png",
                 "Resources/UI/Demo.ui", "Resources/requirements.txt", "DemoLib/data/table.json",
                 # not packaged:
                 "DemoLib/__pycache__/a.cpython-311.pyc", ".hidden.py", "DemoLib/.cache/x.py", "Testing/test_x.py",
                 "DemoLib/a.py~"):
        (module_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (module_dir / name).write_text("")
    (module_dir / "CMakeLists.txt").write_text(textwrap.dedent("""\
        set(MODULE_NAME Demo)
        set(MODULE_PYTHON_SCRIPTS
          # BEGIN generated SCRIPTS
          Old.py
          # END generated SCRIPTS
          )
        set(MODULE_PYTHON_RESOURCES
          # BEGIN generated RESOURCES
          # END generated RESOURCES
          )
        slicerMacroBuildScriptedModule(NAME ${MODULE_NAME} SCRIPTS ${MODULE_PYTHON_SCRIPTS}
          RESOURCES ${MODULE_PYTHON_RESOURCES} WITH_GENERIC_TESTS)
        """))

    assert script.main(["--check", "--root", str(tmp_path)]) == 1
    report = capsys.readouterr().out
    assert "does not list: Demo.py, DemoLib/__init__.py" in report and "do not exist: Old.py" in report
    assert "update_cmake_lists.py" in report

    assert script.main(["--root", str(tmp_path)]) == 0
    assert script.main(["--check", "--root", str(tmp_path)]) == 0
    values = cmake_set_values(cmake_commands(module_dir / "CMakeLists.txt"))
    assert values["MODULE_PYTHON_SCRIPTS"] == ["Demo.py", "DemoLib/__init__.py", "DemoLib/sub/a.py"]
    assert values["MODULE_PYTHON_RESOURCES"] == ["DemoLib/data/table.json", "Resources/Icons/Demo.png",
                                                 "Resources/UI/Demo.ui", "Resources/requirements.txt"]
    assert script.main(["--root", str(tmp_path)]) == 0  # idempotent: a second run changes nothing
    assert capsys.readouterr().out.count("updated") == 1

    (module_dir / "DemoLib" / "new file.py").write_text("")
    with pytest.raises(ValueError, match="new file.py"):
        script.collect_files(module_dir)


# --------------------------------------------------------------------------------------------------------------------
# .ui files


@pytest.mark.parametrize("module", MODULES)
def test_ui_file_is_valid_designer_xml(module):
    tree, widgets = ui_widgets(module)
    root = tree.getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == module == root.findtext("class")
    names = [w.get("name") for w in tree.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    # Qt's UI loader needs a <customwidget> entry for every Slicer/CTK class used.
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in widgets.values() if w.get("class").startswith(("qMRML", "qSlicer", "ctk"))}
    assert used <= declared, f"missing <customwidget> for {sorted(used - declared)}"
    # A node selector gets the scene only through a mrmlSceneChanged -> setMRMLScene connection.
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)" and c.findtext("sender") == module}
    for name, widget in widgets.items():
        if widget.get("class") == "qMRMLNodeComboBox":
            assert name in connected, f"{name} is not connected to the scene"
            node_types = widget.find("property[@name='nodeTypes']/stringlist")
            assert node_types is not None and [s.text for s in node_types], f"{name} has no nodeTypes"


@pytest.mark.parametrize("module", MODULES)
def test_widgets_used_by_code_exist_in_ui(module):
    _, widgets = ui_widgets(module)
    used = set(re.findall(r"self\.ui\.(\w+)", module_source(module)))
    assert used, "the module uses no widget from its .ui"
    assert used <= set(widgets), f"{module}.py uses widgets that {module}.ui lacks: {sorted(used - set(widgets))}"
    assert f'resourcePath("UI/{module}.ui")' in module_source(module)


@pytest.mark.parametrize("module", MODULES)
def test_ui_parameter_names_match_parameter_node(module):
    tree, _ = ui_widgets(module)
    bound = {w.get("name"): w.findtext("property[@name='SlicerParameterName']/string")
             for w in tree.iter("widget") if w.find("property[@name='SlicerParameterName']") is not None}
    fields = parameter_node_fields(module)
    assert bound, "no widget is bound to the parameter node"
    for widget, parameter in bound.items():
        assert parameter in fields, f"{widget} is bound to {parameter!r}, which the parameter node does not have"


# --------------------------------------------------------------------------------------------------------------------
# Icons


ICONS = ["M3D.png"] + [f"{m}/Resources/Icons/{m}.png" for m in MODULES]


@pytest.mark.parametrize("relative", ICONS)
def test_icon_is_a_real_128px_png(relative):
    from PIL import Image

    with Image.open(REPO / relative) as image:
        assert image.format == "PNG"
        assert image.size == (128, 128)
        rgba = image.convert("RGBA")
    colours = rgba.getcolors(maxcolors=128 * 128)
    assert len(colours) >= 8, f"{relative} has only {len(colours)} colours: it looks blank"
    visible = sum(count for count, (_r, _g, _b, alpha) in colours if alpha > 0)
    assert visible >= 0.2 * 128 * 128, f"{relative} is mostly transparent"
    most_common = max(count for count, colour in colours if colour[3] > 0)
    assert most_common < 0.5 * visible, f"{relative} is mostly one colour"


# --------------------------------------------------------------------------------------------------------------------
# Python: compiles, stays light


@pytest.mark.parametrize("module", MODULES)
def test_module_file_compiles(module, tmp_path):
    py_compile.compile(str(REPO / module / f"{module}.py"), cfile=str(tmp_path / f"{module}.pyc"), doraise=True)


@pytest.mark.parametrize("module", MODULES)
def test_module_file_imports_nothing_heavy(module):
    imported = set()
    for node in ast.walk(ast.parse(module_source(module))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & set(HEAVY_PACKAGES), f"{module}.py imports {sorted(imported & set(HEAVY_PACKAGES))}"


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that finds the Lib packages in their module folders."""
    paths = [str(REPO / module) for module in MODULES]
    prelude = f"import sys; sys.path[:0] = {paths!r}\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO)


def test_lib_packages_import_without_torch():
    result = _run_isolated(f"""
        import sys
        import M3DAssistantLib, M3DAssistantLib.model, M3DTrainingLib
        heavy = sorted(name for name in {HEAVY_PACKAGES!r} if name in sys.modules)
        assert not heavy, f"importing the Lib packages imported {{heavy}}"
        print("light")
        """)
    assert result.returncode == 0 and "light" in result.stdout, result.stdout + result.stderr


def test_inspect_model_path_does_not_import_torch(tiny_phi3):
    """What the module's Inspect button runs: a full report on a LaMed checkpoint without torch in the process."""
    result = _run_isolated(f"""
        import sys
        from M3DAssistantLib.model.inspection import inspect_checkpoint
        report = inspect_checkpoint({str(tiny_phi3)!r}, compare_with_model=False)
        assert report["will_load"], report
        assert report["tokens"]["[SEG]"] == report["seg_token_id"]
        heavy = sorted(name for name in {HEAVY_PACKAGES!r} if name in sys.modules)
        assert not heavy, f"inspecting a checkpoint imported {{heavy}}"
        print("light")
        """)
    assert result.returncode == 0 and "light" in result.stdout, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------------------------
# The module files under the test harness (Testing/helpers/slicer_harness: real Qt, slicer-core's MRML, Slicer's
# slicer.util)


@pytest.fixture
def load_module(slicer_harness):
    """Import a module file (M3DAssistant.py / M3DTraining.py) as Slicer loads it; the harness is undone after."""
    return slicer_harness.loadModule


@pytest.mark.parametrize("module", MODULES)
def test_module_metadata(module, load_module, slicer_harness):
    load_module(module)
    parent = slicer_harness.app.moduleManager().module(module)  # what Slicer passes as the module's parent
    assert parent.title.startswith("M3D ")
    assert parent.categories == ["M3D"]
    assert parent.contributors
    assert parent.icon is not None and not parent.icon.isNull()  # Resources/Icons/<module>.png
    assert "AI-generated, not for clinical use" in parent.helpText
    for text in ("Bai F.", "arXiv:2404.00578", "BAAI-DCAI/M3D", "MIT", "GoodBaiBai88"):
        assert text in parent.acknowledgementText


def test_assistant_help_names_the_eight_tasks(load_module, slicer_harness):
    load_module("M3DAssistant")
    parent = slicer_harness.app.moduleManager().module("M3DAssistant")
    tasks = re.findall(r"<li><b>([^<]+)</b>", parent.helpText)
    assert tasks == ["Report", "Ask", "Multiple choice", "Locate", "Describe ROI", "Segment",
                     "Segment by description", "Find similar"]
    assert "review" in parent.helpText


def test_assistant_parameter_node_and_logic(load_module, monkeypatch):
    loaded = load_module("M3DAssistant")
    assert loaded.M3DAssistantLogic().getParameterNode().modelSource == "GoodBaiBai88/M3D-LaMed-Phi-3-4B"
    fields = parameter_node_fields("M3DAssistant")
    assert fields == {
        "inputVolume": "vtkMRMLScalarVolumeNode", "modelChoice": "Annotated[str, Choice(MODEL_CHOICES)]",
        "modelSource": "str", "runOn": "Annotated[str, Choice(RUN_CHOICES)]", "serverUrl": "str",
        "windowPreset": "Annotated[str, Choice(WINDOW_CHOICES)]", "cropRoi": "vtkMRMLMarkupsROINode",
        "describeRoi": "vtkMRMLMarkupsROINode", "outputSegmentation": "vtkMRMLSegmentationNode",
        "maxNewTokens": "Annotated[int, WithinRange(1, 1024)]", "choices": "str",
        "confidence": "bool", "evidence": "bool", "evidenceSteps": "Annotated[int, WithinRange(1, 64)]",
        "refine": "bool", "locate": "bool", "maskRoi": "bool",
        "evidenceOpacity": "Annotated[float, WithinRange(0.0, 1.0)]"}
    from M3DAssistantLib.tasks import OPTIONS

    assert {option.logic_name for option in OPTIONS} <= set(fields)  # every analysis option has its panel field
    assert not [name for name in fields if name.lower().endswith("token")]  # the server token is never in the scene

    # By default the Logic calls M3DAssistantLib.model.inspection.inspect_checkpoint, imported when first needed.
    calls = []
    fake = types.ModuleType("M3DAssistantLib.model.inspection")
    fake.inspect_checkpoint = lambda source, compare_with_model=True: (
        calls.append((source, compare_with_model)) or {"folder": source, "will_load": False})
    monkeypatch.setitem(sys.modules, "M3DAssistantLib.model.inspection", fake)
    logic = loaded.M3DAssistantLogic()
    assert logic.inspectModel(" /models/m3d ") == {"folder": "/models/m3d", "will_load": False}
    assert calls == [("/models/m3d", False)]  # Slicer's process never builds the model (that imports torch)
    assert json.loads(logic.formatSummary({"folder": "/models/m3d", "dtypes": ("bfloat16",)})) == {
        "folder": "/models/m3d", "dtypes": ["bfloat16"]}

    with pytest.raises(ValueError, match="No model given"):
        logic.inspectModel("  ")
    with pytest.raises(TypeError, match="expected a dict"):
        loaded.M3DAssistantLogic(inspector=lambda source: "not a dict").inspectModel("x/y")
    assert calls == [("/models/m3d", False)]  # Slicer's process never builds the model (that imports torch)

    run_slicer_self_test(loaded.M3DAssistantTest, "test_InspectModel", "test_ParameterNode")


# M3DTraining's parameter node, Logic and self-tests: test_training_module.py.


def test_pyproject_lists_every_lib_package():
    """A sub-package missing from pyproject's list would be left out of the wheel (the editable install hides it)."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = set()
    for name, folder in config["package-dir"].items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(REPO / folder)
            on_disk.add(".".join((name, *relative.parts)))
    assert set(config["packages"]) == on_disk
