"""One exception hierarchy. Every message names the problem and how to fix it."""

from __future__ import annotations


class M3DError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(M3DError):
    """A checkpoint's config.json asks for something we do not support or is inconsistent."""


class CheckpointError(M3DError):
    """Weights are missing, partial, corrupted or do not match the model."""


class TokenizerError(CheckpointError):
    """The checkpoint's tokenizer files are missing or lack the M3D special tokens."""


class ModelNotAvailableError(M3DError):
    """The model is neither a local folder nor in the hub cache, and the hub cannot be reached."""


class InputError(M3DError, ValueError):
    """Bad user input: a volume, prompt, box or ROI that cannot be used as given."""


class LabelMapError(InputError):
    """A label map or mask was given where an image (CT, MR) is needed."""


class GeometryError(InputError):
    """A volume's geometry (IJK->RAS matrix, ROI, box) cannot be mapped."""


class CancelledError(M3DError):
    """Work was cancelled by the user."""


class OutputWriteError(M3DError, OSError):
    """The file system refused a write (disk full, permission denied, read-only folder, ...)."""
