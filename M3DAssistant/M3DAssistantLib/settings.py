"""Per-computer settings of the Slicer modules (the worker's Python, the model cache, remembered tokens, recent
training jobs): Qt's QSettings under the module's name, never the scene. Tests use the dict-backed twin."""

from __future__ import annotations

from typing import Optional


class ModuleSettings:
    """``get(key, default)`` / ``set(key, value)`` on QSettings ``<module>/<key>``; an empty value removes the key.

    Qt is imported on use: only Slicer's process calls these."""

    def __init__(self, module: str) -> None:
        self.module = module

    def get(self, key: str, default: str = "") -> str:
        import qt

        value = qt.QSettings().value(f"{self.module}/{key}")
        return default if value is None else str(value)

    def set(self, key: str, value: str) -> None:
        import qt

        settings = qt.QSettings()
        if value:
            settings.setValue(f"{self.module}/{key}", value)
        else:
            settings.remove(f"{self.module}/{key}")


class MemorySettings:
    """The same interface over a dict (tests and self-tests: nothing reaches the computer's QSettings)."""

    def __init__(self, values: Optional[dict] = None) -> None:
        self.values = dict(values or {})

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, default)

    def set(self, key: str, value: str) -> None:
        self.values[key] = value
