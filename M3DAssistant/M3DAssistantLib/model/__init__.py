"""M3D-LaMed and M3D-CLIP: our implementation, loading the official checkpoints as published.

Usage (the official Quickstart's call shape)::

    from M3DAssistantLib.model import load_model
    model, tokenizer = load_model("GoodBaiBai88/M3D-LaMed-Phi-3-4B", device="cuda", dtype=torch.bfloat16)

Imports are lazy so that ``import M3DAssistantLib.model`` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model": "loading",
    "load_clip": "loading",
    "resolve_checkpoint": "hub",
    "DEFAULT_MODEL": "hub",
    "DEFAULT_CLIP": "hub",
    "inspect_checkpoint": "inspection",
    "encode_prompt": "tokenizer",
    "decode": "tokenizer",
    "parse_lamed_config": "configuration_lamed",
    "MultimodalConfig": "configuration_lamed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
