"""The MRML nodes this module adds to a scene (loss-curve table, plot series and chart; evaluation tables), marked
with two attributes so that they are found again -- also in a saved and reloaded scene -- and a node the user made
is never reused or changed. The functions take the scene they work on, so they run on slicer-core as in Slicer.
"""

from __future__ import annotations

from typing import Any

ROLE_ATTRIBUTE = "M3DTraining.role"
FOLDER_ATTRIBUTE = "M3DTraining.outputFolder"


def our_node(scene: Any, class_name: str, role: str, folder: str) -> Any:
    """The node of ``class_name`` that this module made for ``folder`` in this ``role`` (never a user's node)."""
    nodes = scene.GetNodesByClass(class_name)
    nodes.UnRegister(None)  # the collection returned by GetNodesByClass is owned by the caller
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(ROLE_ATTRIBUTE) == role and node.GetAttribute(FOLDER_ATTRIBUTE) == folder:
            return node
    return None


def new_node(scene: Any, class_name: str, name: str, role: str, folder: str) -> Any:
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetAttribute(FOLDER_ATTRIBUTE, folder)
    return node
