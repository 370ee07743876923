"""Byte sizes in messages: one formatter, in binary units labelled as such (1 GiB = 1024**3 bytes).

Binary because what users compare these sizes with is binary: GPU memory (nvidia-smi reports MiB, PyTorch's
out-of-memory messages GiB), the server's upload limits (MiB), the memory a volume needs (GiB). Labelled KiB / MiB /
GiB / TiB so that nobody reads a power of 1000. Standard library only.
"""

from __future__ import annotations

from typing import Optional

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

_UNITS = ((TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB"))


def format_bytes(n: Optional[float]) -> str:
    """``"6.6 GiB"``, ``"512.0 MiB"``, ``"900 B"``; ``"unknown size"`` for None.

    The largest unit that keeps the number at 1 or more, one decimal (whole bytes below 1 KiB).
    """
    if n is None:
        return "unknown size"
    n = float(n)
    for size, unit in _UNITS:
        # 1048575 bytes is "1.0 MiB", not "1024.0 KiB" (bytes are shown whole, so 1023 B stays)
        if abs(n) >= size or (size > KIB and round(abs(n) / (size >> 10), 1) >= 1024):
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


__all__ = ["GIB", "KIB", "MIB", "TIB", "format_bytes"]
