"""units: the one byte formatter (binary units, labelled as such)."""

from __future__ import annotations

import pytest

from M3DAssistantLib.units import GIB, KIB, MIB, TIB, format_bytes


@pytest.mark.parametrize("n, text", [
    (None, "unknown size"), (0, "0 B"), (900, "900 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (MIB - 1, "1.0 MiB"), (512 * MIB, "512.0 MiB"), (24 * GIB, "24.0 GiB"), (7_100_000_000, "6.6 GiB"),
    (3 * TIB, "3.0 TiB"), (4096 * TIB, "4096.0 TiB"), (-2 * GIB, "-2.0 GiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_units_are_powers_of_1024():
    assert (KIB, MIB, GIB, TIB) == (2**10, 2**20, 2**30, 2**40)
