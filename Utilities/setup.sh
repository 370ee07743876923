#!/usr/bin/env bash
# Creates .venv in the repository and installs M3D for Slicer with one set of extras.
# Usage: bash Utilities/setup.sh [inference|server|training|test]   (default: inference)
# torch is pinned to 2.13.0 first: a bare "torch" requirement pulls a multi-GB CUDA build on Linux, while
# 2.13.0 is also available as a CPU wheel. Set PYTHON to choose the interpreter (>= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-inference}"
python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "M3D for Slicer needs Python >= 3.10")'
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[$extra]"
echo "ready: .venv (extras: $extra)"
