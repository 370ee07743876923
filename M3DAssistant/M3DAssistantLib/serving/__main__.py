"""``python -m M3DAssistantLib.serving``: run ``m3d serve`` (the worker the Slicer module starts)."""

import sys

from .server import main

sys.exit(main())
