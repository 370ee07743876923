"""What the local worker needs in Slicer's Python, and the text of the one confirmation that lists it.

Slicer-independent (no ``slicer``, no Qt): the module's Logic does the installing itself, on Slicer's main thread and
only after the user agreed once: torch through the PyTorch extension (``PyTorchUtils``, which picks the CUDA build that
matches the GPU), everything else with ``slicer.packaging.pip_ensure`` from ``Resources/requirements.txt``. This
module reads that file, leaves out what Slicer ships itself (numpy, SimpleITK, VTK: never replaced) and torch (not a
pip requirement here), and says what is missing.

Nothing is checked or installed when Slicer starts; only when a local worker is first needed.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

REQUIREMENTS_PATH = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
"""``M3DAssistant/Resources/requirements.txt``: the worker's packages besides torch."""

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
    """Requirement lines of a requirements.txt, without comments, pip options and :data:`SKIP_PACKAGES`."""
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


@dataclasses.dataclass
class InstallPlan:
    """What must be installed before the local worker can run."""

    torch: Optional[str]  # the torch requirement when torch is missing or too old, else None
    packages: list[str]  # other missing requirements, as in requirements.txt

    @property
    def needed(self) -> bool:
        return self.torch is not None or bool(self.packages)

    def items(self) -> list[str]:
        return ([f"{self.torch} (through the PyTorch extension, matching your GPU)"] if self.torch else []) + \
            list(self.packages)

    def describe(self) -> str:
        """The confirmation text: everything that will be installed, in one list."""
        if not self.needed:
            return "Everything the M3D worker needs is installed."
        lines = "\n".join(f"  - {item}" for item in self.items())
        return ("M3D Assistant runs the model in a separate Python process, which needs these Python packages in "
                "Slicer's Python environment:\n\n" + lines + "\n\nThey are downloaded from the Python Package Index "
                "(several GB with torch). Slicer's own numpy and SimpleITK are not changed. Install them now?")


def plan_installation(requirements: Optional[Sequence[str]] = None,
                      version_of: VersionLookup = importlib.metadata.version) -> InstallPlan:
    """What is missing of torch and ``requirements`` (default: :func:`read_requirements`)."""
    requirements = read_requirements() if requirements is None else list(requirements)
    torch = None if is_satisfied(TORCH_REQUIREMENT, version_of) else TORCH_REQUIREMENT
    return InstallPlan(torch, [r for r in requirements if not is_satisfied(r, version_of)])


__all__ = ["REQUIREMENTS_PATH", "TORCH_REQUIREMENT", "SLICER_OWNED_PACKAGES", "SKIP_PACKAGES", "InstallPlan",
           "canonical_name", "requirement_name", "read_requirements", "is_satisfied", "plan_installation"]
