"""dependencies: the one installer of both modules -- its requirement files against pyproject.toml, and each kind of
Python (Slicer's own with stand-ins for Slicer's dialogs, pip_ensure and PyTorchUtils; another Python in a real
subprocess; a remote server)."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from pathlib import Path

import pytest
import tomllib
from repo_paths import REPO

from M3DAssistantLib import dependencies
from M3DAssistantLib.dependencies import (
    OtherPythonDependencies,
    RemoteServerDependencies,
    SlicerPythonDependencies,
    canonical_name,
    dependencies_for,
    read_requirements,
    requirement_name,
)
from M3DAssistantLib.errors import CancelledError, M3DError

# Each module's requirements file = these pyproject extras, less what is not pip-installed into Slicer's Python.
NOT_IN_SLICERS_PIP = {
    "torch": "PyTorchUtils installs the build for the GPU",
    "simpleitk": "Slicer's own, never replaced",
    "nibabel": "only the m3d command's NIfTI writer imports it (volumes are read with SimpleITK)",
    "highdicom": "only the m3d command's DICOM SEG writer imports it",
    "pydicom": "not imported by the worker or the trainer (Slicer ships its own)",
    "pillow": "not imported directly (Slicer ships its own; matplotlib brings it where needed)",
}
MODULES = {
    "M3DAssistant": (("inference", "server"), {
        **NOT_IN_SLICERS_PIP,
        "scipy": "not imported by the worker",
        "monai": "only the training's losses and augmentation use it",
    }),
    "M3DTraining": (("inference", "training"), NOT_IN_SLICERS_PIP),
}


def requirements_file(module: str) -> Path:
    return REPO / module / "Resources" / "Requirements" / f"{module}.txt"


def raw_lines(path: Path) -> list[str]:
    lines = [line.split(" #", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "-"))]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_requirements_file_has_the_packages_and_bounds_of_the_pyproject_extras(module):
    extras, left_out = MODULES[module]
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = {r for extra in extras for r in optional[extra] if not r.startswith("m3d-slicer")}
    names = {canonical_name(requirement_name(r)) for r in wanted}
    assert set(left_out) <= names  # no stale reason
    expected = {r for r in wanted if canonical_name(requirement_name(r)) not in left_out}
    lines = raw_lines(requirements_file(module))
    assert len(lines) == len(set(lines)) and set(lines) == expected  # same packages, same bounds, each once
    assert read_requirements(requirements_file(module)) == lines  # the installer reads every line


@pytest.mark.parametrize("module", sorted(MODULES))
def test_requirements_never_name_slicers_own_packages_or_torch(module):
    names = {canonical_name(requirement_name(r)) for r in raw_lines(requirements_file(module))}
    assert names and not names & {"numpy", "simpleitk", "vtk", "torch", "torchvision", "torchaudio"}


def test_the_assistant_file_is_the_default_and_the_launcher_needs_are_training_needs():
    from M3DTrainingLib.requirements import LAUNCHER_MODULES

    assert dependencies.ASSISTANT_REQUIREMENTS == requirements_file("M3DAssistant")
    assert read_requirements() == raw_lines(requirements_file("M3DAssistant"))
    assert set(LAUNCHER_MODULES.values()) <= set(raw_lines(requirements_file("M3DTraining")))


def test_requirement_files_install_to_distinct_paths():
    """Slicer installs every module's Resources into one folder: two files of the same name would overwrite each
    other (slicerMacroBuildScriptedModule without WITH_SUBDIR)."""
    installed = [p.relative_to(REPO / m).as_posix() for m in MODULES for p in (REPO / m / "Resources").rglob("*")
                 if p.is_file()]
    assert len(installed) == len(set(installed))


# ---------------------------------------------------------------------------------------------------------------------
# Slicer's Python, with stand-ins for what only the Slicer application has
# ---------------------------------------------------------------------------------------------------------------------


class FakeSlicer:
    """``slicer`` as the installer uses it: app.testingEnabled, util.confirmOkCancelDisplay, packaging.pip_ensure.
    Installing puts the requirement's lowest allowed version into ``installed``."""

    def __init__(self, installed: dict, answer: bool = True, testing: bool = False, packaging: bool = True,
                 pip_installs: bool = True):
        self.installed, self.calls = installed, []
        self.app = types.SimpleNamespace(testingEnabled=lambda: testing)

        def confirm(text, windowTitle="", detailedText=""):
            self.calls.append(("confirm", text, windowTitle, detailedText))
            return answer

        def install(requirements):
            if pip_installs:
                for r in requirements:
                    self.installed[requirement_name(r)] = r.split(">=")[1].split(",")[0]

        def pip_ensure(requirements, **kwargs):
            self.calls.append(("pip_ensure", list(requirements), kwargs))
            install(requirements)

        def pip_install(text):
            self.calls.append(("pip_install", text))
            install(text.split())

        self.util = types.SimpleNamespace(confirmOkCancelDisplay=confirm, pip_install=pip_install)
        if packaging:
            self.packaging = types.SimpleNamespace(pip_ensure=pip_ensure)


def fake_pytorch_utils(installed: dict, calls: list, works: bool = True):
    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=True, torchVersionRequirement=""):
            calls.append(("installTorch", askConfirmation, torchVersionRequirement))
            if not works:
                return None
            installed["torch"] = "2.13.0+cu128"
            return types.SimpleNamespace(__version__="2.13.0+cu128")

    return types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)


def version_lookup(installed: dict):
    def version_of(name):
        try:
            return installed[name]
        except KeyError:
            raise importlib.metadata.PackageNotFoundError(name) from None

    return version_of


def slicer_python(monkeypatch, installed, *, torch_works=True, **slicer_options):
    fake = FakeSlicer(installed, **slicer_options)
    monkeypatch.setitem(sys.modules, "slicer", fake)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fake_pytorch_utils(installed, fake.calls, torch_works))
    deps = SlicerPythonDependencies(["transformers>=5.24,<6", "fastapi>=0.110"], requester="M3D Test",
                                    purpose="The test worker needs these", declined="Declined: no worker.",
                                    version_of=version_lookup(installed))
    return deps, fake


def test_slicer_python_asks_once_then_installs_torch_through_pytorchutils_and_the_rest_with_pip_ensure(monkeypatch):
    installed = {"transformers": "5.30.0", "torch": "2.3.0"}  # torch too old, fastapi missing
    deps, fake = slicer_python(monkeypatch, installed)
    assert deps.missing().items()[0].startswith("torch>=2.4") and deps.missing().packages == ["fastapi>=0.110"]
    deps.ensure()
    confirm, torch, pip = fake.calls
    assert confirm[0] == "confirm" and confirm[2] == "M3D Test: install Python packages"
    assert confirm[1].startswith("The test worker needs these:") and "fastapi>=0.110" in confirm[1]
    assert "torch>=2.4" in confirm[1] and "numpy and SimpleITK are not changed" in confirm[1]
    assert torch == ("installTorch", False, ">=2.4")  # asked once already: PyTorchUtils does not ask again
    assert pip[:2] == ("pip_ensure", ["fastapi>=0.110"])
    assert pip[2]["prompt_install"] is False and pip[2]["requester"] == "M3D Test"
    assert {"numpy", "SimpleITK", "vtk", "torch"} <= set(pip[2]["skip_packages"])  # Slicer's own never replaced
    assert not deps.missing().needed
    deps.ensure()  # everything there: no second question
    assert len(fake.calls) == 3


def test_slicer_python_declined_testing_mode_and_failures_install_nothing(monkeypatch):
    deps, fake = slicer_python(monkeypatch, {}, answer=False)
    with pytest.raises(CancelledError, match="Declined: no worker."):
        deps.ensure()
    assert [c[0] for c in fake.calls] == ["confirm"]

    deps, fake = slicer_python(monkeypatch, {}, testing=True)
    with pytest.raises(M3DError, match="M3D Test needs torch>=2.4 .*fastapi>=0.110 in Slicer's Python; nothing is "
                                       "installed in testing mode"):
        deps.ensure()
    assert fake.calls == []

    deps, fake = slicer_python(monkeypatch, {"torch": "2.13.0"}, pip_installs=False)
    with pytest.raises(M3DError, match=r"Still missing after the installation: transformers>=5.24,<6, fastapi"):
        deps.ensure()

    deps, fake = slicer_python(monkeypatch, {}, torch_works=False)
    with pytest.raises(M3DError, match="PyTorch was not installed"):
        deps.ensure()
    assert [c[0] for c in fake.calls] == ["confirm", "installTorch"]  # nothing else after torch failed

    deps, fake = slicer_python(monkeypatch, {})
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the PyTorch extension is not installed
    with pytest.raises(M3DError, match="install the PyTorch extension with the Extensions Manager"):
        deps.ensure()


def test_slicer_python_without_asking_and_on_slicer_before_5_12(monkeypatch):
    deps, fake = slicer_python(monkeypatch, {"torch": "2.13.0"}, packaging=False)
    deps.ask = False  # a script asked for it
    deps.ensure()
    assert fake.calls == [("pip_install", "transformers>=5.24,<6 fastapi>=0.110")]


# ---------------------------------------------------------------------------------------------------------------------
# another Python (a real subprocess), a remote server, the choice
# ---------------------------------------------------------------------------------------------------------------------


def test_another_python_is_checked_in_a_subprocess_and_never_changed(tmp_path):
    ok = OtherPythonDependencies(sys.executable, ["pytest>=1", "numpy>=1"], setting="Training Python")
    assert not ok.missing().needed
    ok.ensure()
    lacking = OtherPythonDependencies(sys.executable, ["pytest>=1", "no-such-package-m3d>=1.0"],
                                      setting="Training Python", torch="torch>=999")
    plan = lacking.missing()
    assert plan.torch == "torch>=999" and plan.packages == ["no-such-package-m3d>=1.0"]
    with pytest.raises(M3DError) as error:
        lacking.ensure()
    message = str(error.value)
    assert message.startswith(f"The training Python {sys.executable} lacks torch>=999, no-such-package-m3d>=1.0.")
    assert f'{sys.executable} -m pip install "no-such-package-m3d>=1.0"' in message
    assert "pytorch.org" in message and "clear the Training Python setting" in message
    with pytest.raises(M3DError, match="cannot be run.*Worker Python"):
        OtherPythonDependencies(str(tmp_path / "no-python"), ["pytest>=1"]).missing()


def test_dependencies_for_picks_the_kind_of_python(monkeypatch):
    common = dict(setting="Worker Python", requester="M3D Assistant")
    remote = dependencies_for(None, ["anything>=1"], remote=True, **common)
    assert isinstance(remote, RemoteServerDependencies) and not remote.missing().needed
    remote.ensure()
    other = dependencies_for("/opt/venv/bin/python", ["a>=1"], **common)
    assert isinstance(other, OtherPythonDependencies) and other.python == "/opt/venv/bin/python"
    slicers = dependencies_for(None, ["a>=1"], ask=False, **common)
    assert isinstance(slicers, SlicerPythonDependencies) and slicers.ask is False
    assert slicers.requester == "M3D Assistant" and slicers.requirements == ["a>=1"]
