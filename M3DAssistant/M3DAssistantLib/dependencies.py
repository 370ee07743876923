"""The one installer of both Slicer modules: what a Python needs to run the M3D worker or the trainer, and making
sure it has it.

Each module lists its packages in one requirements file (``M3DAssistant/Resources/Requirements/M3DAssistant.txt``,
``M3DTraining/Resources/Requirements/M3DTraining.txt``: one name per module because Slicer installs every module's
``Resources`` into one shared folder), the same packages and bounds as its ``pyproject.toml`` extras (a test checks).
What a Python needs is a :class:`Dependencies`, one small class per kind of Python (as SlicerMONAIAuto3DSeg's
``dependency_handler.py``):

- :class:`SlicerPythonDependencies`: Slicer's own Python. After ONE confirmation listing everything, torch through
  the PyTorch extension (``PyTorchUtils``, which picks the CUDA build that matches the GPU) and the rest with
  ``slicer.packaging.pip_ensure``. Slicer's own numpy, SimpleITK and VTK are never installed or replaced. Nothing is
  installed in Slicer's testing mode (a missing package is then an error).
- :class:`OtherPythonDependencies`: a Python the user chose in the settings. Never changed: it is checked in a short
  subprocess and the error names the pip command to run there.
- :class:`RemoteServerDependencies`: the server has its own packages; nothing to do here.

:func:`dependencies_for` picks the class. Slicer-independent at import (no ``slicer``, no Qt: ``slicer`` and
``PyTorchUtils`` are imported when installing). Nothing is checked or installed when Slicer starts; only when a
worker or a training first needs it.

``python -m M3DAssistantLib.dependencies REQUIREMENT...`` prints the unsatisfied ones as JSON (how another Python is
checked).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import CancelledError, M3DError

ASSISTANT_REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "Requirements" / "M3DAssistant.txt"
"""What the local worker needs besides torch (the same relative place in the source tree and in Slicer's install)."""

REQUIREMENTS_PATH = ASSISTANT_REQUIREMENTS  # the default of read_requirements

TORCH_REQUIREMENT = "torch>=2.4"
"""Installed through PyTorchUtils (``installTorch(torchVersionRequirement=">=2.4")``), never with plain pip."""

SLICER_OWNED_PACKAGES = ("numpy", "SimpleITK", "vtk")
"""Slicer's own builds: never installed or replaced (also passed to pip_ensure as ``skip_packages`` so that no
dependency pulls a different version in)."""

TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")

SKIP_PACKAGES = SLICER_OWNED_PACKAGES + TORCH_PACKAGES

_NAME_RE = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")

VersionLookup = Callable[[str], str]


def canonical_name(name: str) -> str:
    """PEP 503 normalised package name (``SimpleITK`` -> ``simpleitk``, ``huggingface_hub`` -> ``huggingface-hub``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The package name of a requirement line (``transformers>=5.24,<6`` -> ``transformers``)."""
    match = _NAME_RE.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def read_requirements(path: Path = REQUIREMENTS_PATH) -> list[str]:
    """Requirement lines of a requirements file, without comments, pip options and :data:`SKIP_PACKAGES` (as
    ``slicer.packaging.load_requirements`` reads it, without needing Slicer)."""
    skipped = {canonical_name(n) for n in SKIP_PACKAGES}
    requirements = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        if canonical_name(requirement_name(line)) not in skipped:
            requirements.append(line)
    return requirements


def is_satisfied(requirement: str, version_of: VersionLookup = importlib.metadata.version) -> bool:
    """Whether the installed version of the package satisfies ``requirement`` (markers honoured when the
    ``packaging`` library is there, as it is in Slicer; without it any installed version counts)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    name = requirement_name(requirement)
    try:
        installed = version_of(name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if Requirement is None:
        return installed is not None
    parsed = Requirement(requirement)
    if parsed.marker is not None and not parsed.marker.evaluate():
        return True  # not needed on this platform
    return installed is not None and parsed.specifier.contains(installed, prereleases=True)


DEFAULT_PURPOSE = ("M3D Assistant runs the model in a separate Python process, which needs these Python packages in "
                   "Slicer's Python environment")


@dataclasses.dataclass
class InstallPlan:
    """What must be installed before a Python can do its job."""

    torch: Optional[str]  # the torch requirement when torch is missing or too old, else None
    packages: list[str]  # other missing requirements, as in the requirements file

    @property
    def needed(self) -> bool:
        return self.torch is not None or bool(self.packages)

    def items(self) -> list[str]:
        return ([f"{self.torch} (through the PyTorch extension, matching your GPU)"] if self.torch else []) + \
            list(self.packages)

    def describe(self, purpose: str = DEFAULT_PURPOSE) -> str:
        """The confirmation text: why, then everything that will be installed, in one list."""
        if not self.needed:
            return "Everything is installed."
        lines = "\n".join(f"  - {item}" for item in self.items())
        size = " (several GB with torch)" if self.torch else ""
        return (f"{purpose}:\n\n{lines}\n\nThey are downloaded from the Python Package Index{size}. Slicer's own "
                "numpy and SimpleITK are not changed. Install them now?")


def plan_installation(requirements: Optional[Sequence[str]] = None,
                      version_of: VersionLookup = importlib.metadata.version,
                      torch: Optional[str] = TORCH_REQUIREMENT) -> InstallPlan:
    """What is missing of ``torch`` (None: not needed) and ``requirements`` (default: :func:`read_requirements`)."""
    requirements = read_requirements() if requirements is None else list(requirements)
    missing_torch = None if torch is None or is_satisfied(torch, version_of) else torch
    return InstallPlan(missing_torch, [r for r in requirements if not is_satisfied(r, version_of)])


# ----------------------------------------------------------------------------------------------------------------------
# One class per kind of Python
# ----------------------------------------------------------------------------------------------------------------------


class Dependencies(abc.ABC):
    """What one Python needs for one job, and making sure it has it."""

    @abc.abstractmethod
    def missing(self) -> InstallPlan:
        """What that Python lacks (nothing is installed)."""

    @abc.abstractmethod
    def ensure(self) -> None:
        """Return when the Python has everything; install it (after asking) where that is allowed, else raise
        :class:`M3DError` (:class:`CancelledError` when the user declined) saying what to do."""


class RemoteServerDependencies(Dependencies):
    """A remote server runs the model with its own packages: nothing is needed here."""

    def missing(self) -> InstallPlan:
        return InstallPlan(None, [])

    def ensure(self) -> None:
        return None


class SlicerPythonDependencies(Dependencies):
    """Slicer's own Python: installed after one confirmation, torch through the PyTorch extension.

    :param requirements: pip requirement lines (from the module's requirements file; Slicer's own packages and torch
        are left out by :func:`read_requirements`)
    :param requester: who asks, for the dialog title and pip_ensure's log ("M3D Assistant")
    :param purpose: the first sentence of the confirmation (translated by the caller)
    :param declined: the message of the :class:`CancelledError` when the user says no (translated by the caller)
    :param torch: the torch requirement, None when the job does not need torch
    :param ask: show the confirmation (False: a script asked for it; install without asking)
    """

    def __init__(self, requirements: Sequence[str], *, requester: str, purpose: str = DEFAULT_PURPOSE,
                 declined: str = "Installation declined: nothing can run without these packages.",
                 torch: Optional[str] = TORCH_REQUIREMENT, ask: bool = True,
                 version_of: VersionLookup = importlib.metadata.version):
        self.requirements = list(requirements)
        self.requester, self.purpose, self.declined = requester, purpose, declined
        self.torch, self.ask, self.version_of = torch, ask, version_of

    def missing(self) -> InstallPlan:
        return plan_installation(self.requirements, self.version_of, self.torch)

    def ensure(self) -> None:
        import slicer

        plan = self.missing()
        if not plan.needed:
            return
        app = getattr(slicer, "app", None)
        if app is not None and app.testingEnabled():
            raise M3DError(f"{self.requester} needs {', '.join(plan.items())} in Slicer's Python; nothing is "
                           "installed in testing mode")
        if self.ask and not slicer.util.confirmOkCancelDisplay(
                plan.describe(self.purpose), windowTitle=f"{self.requester}: install Python packages",
                detailedText="\n".join(plan.items())):
            raise CancelledError(self.declined)
        if plan.torch:
            self._install_torch(plan.torch)
        if plan.packages:
            self._install_packages(slicer, plan.packages)
        importlib.invalidate_caches()  # pip ran in another process: see what it installed
        left = self.missing()
        if left.needed:
            raise M3DError(f"Still missing after the installation: {', '.join(left.items())}; see the Python "
                           "console for pip's messages.")

    @staticmethod
    def _install_torch(requirement: str) -> None:
        try:
            import PyTorchUtils
        except ImportError:
            raise M3DError("PyTorch is needed: install the PyTorch extension with the Extensions Manager, restart "
                           "Slicer and try again.") from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=requirement.removeprefix("torch"))
        if torch is None:
            raise M3DError("PyTorch was not installed; see the Python console for why.")

    def _install_packages(self, slicer, packages: list[str]) -> None:
        try:
            if hasattr(slicer, "packaging"):  # Slicer >= 5.12
                slicer.packaging.pip_ensure(packages, skip_packages=list(SKIP_PACKAGES), prompt_install=False,
                                            requester=self.requester)
            else:
                slicer.util.pip_install(" ".join(packages))
        except subprocess.CalledProcessError as e:
            raise M3DError(f"pip could not install {', '.join(packages)} (exit status {e.returncode}); see the "
                           "Python console for why.") from e


class OtherPythonDependencies(Dependencies):
    """A Python the user chose: checked, never changed; the error names what to install there.

    :param python: its executable
    :param setting: the setting that chose it, as the panel labels it ("Worker Python", "Training Python")
    :param env: its environment (default: this process's)
    """

    def __init__(self, python: str, requirements: Sequence[str], *, setting: str = "Worker Python",
                 torch: Optional[str] = TORCH_REQUIREMENT, env: Optional[dict] = None, timeout_s: float = 120.0,
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run):
        self.python, self.requirements, self.setting, self.torch = python, list(requirements), setting, torch
        self.env, self.timeout_s, self.run = env, timeout_s, run

    def missing(self) -> InstallPlan:
        wanted = ([self.torch] if self.torch else []) + self.requirements
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent)] +
                                            [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        try:
            done = self.run([self.python, "-m", __name__, *wanted], capture_output=True, text=True,
                            timeout=self.timeout_s, env=env, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise M3DError(f"the Python {self.python} cannot be run ({e}); choose another one in the {self.setting} "
                           "setting, or clear it to use Slicer's own.") from e
        for line in reversed((done.stdout or "").splitlines()):
            if line.startswith(_UNSATISFIED):
                missing = json.loads(line[len(_UNSATISFIED):])
                torch = self.torch if self.torch in missing else None
                return InstallPlan(torch, [r for r in missing if r != self.torch])
        raise M3DError(f"the Python {self.python} failed (exit status {done.returncode}): "
                       f"{(done.stderr or done.stdout or '').strip()[-500:]}")

    def ensure(self) -> None:
        plan = self.missing()
        if not plan.needed:
            return
        how = []
        if plan.packages:
            how.append(f"{self.python} -m pip install " + " ".join(f'"{r}"' for r in plan.packages))
        if plan.torch:
            how.append(f"{plan.torch} in the build for your GPU: https://pytorch.org/get-started/locally/")
        names = ([plan.torch] if plan.torch else []) + plan.packages
        raise M3DError(f"The {self.setting[:1].lower() + self.setting[1:]} {self.python} lacks {', '.join(names)}. "
                       f"Install them there ({'; '.join(how)}), or clear the {self.setting} setting to use Slicer's "
                       "own Python, where they are installed for you after one question.")


def dependencies_for(python: Optional[str], requirements: Sequence[str], *, remote: bool = False, setting: str,
                     requester: str, purpose: str = DEFAULT_PURPOSE,
                     declined: str = "Installation declined: nothing can run without these packages.",
                     torch: Optional[str] = TORCH_REQUIREMENT, ask: bool = True,
                     env: Optional[dict] = None) -> Dependencies:
    """The :class:`Dependencies` of a job: nothing for a remote server, a check of ``python`` when the user chose
    one (the ``setting``), else Slicer's own Python (installing after one confirmation)."""
    if remote:
        return RemoteServerDependencies()
    if python:
        return OtherPythonDependencies(python, requirements, setting=setting, torch=torch, env=env)
    return SlicerPythonDependencies(requirements, requester=requester, purpose=purpose, declined=declined,
                                    torch=torch, ask=ask)


_UNSATISFIED = "M3D-UNSATISFIED "


def _main(argv: Sequence[str]) -> int:
    """Print the requirements of ``argv`` that this Python does not satisfy (how another Python is checked)."""
    print(_UNSATISFIED + json.dumps([r for r in argv if not is_satisfied(r)]))
    return 0


__all__ = ["ASSISTANT_REQUIREMENTS", "REQUIREMENTS_PATH", "TORCH_REQUIREMENT", "SLICER_OWNED_PACKAGES",
           "SKIP_PACKAGES", "Dependencies", "InstallPlan", "OtherPythonDependencies", "RemoteServerDependencies",
           "SlicerPythonDependencies", "canonical_name", "dependencies_for", "is_satisfied", "plan_installation",
           "read_requirements", "requirement_name"]

if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
