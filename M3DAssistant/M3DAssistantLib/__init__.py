"""M3DAssistantLib: Slicer-independent core of M3D for 3D Slicer.

Nothing heavy is imported here (no torch, no transformers), so that Slicer's module panel and the HTTP client stay
light. Import the submodules you need: ``M3DAssistantLib.model``, ``M3DAssistantLib.geometry``, ...
"""

__version__ = "0.1.0"

AI_LABEL = "AI-generated, not for clinical use"
