"""MRML glue: read a volume node for the model, write its results back as new nodes.

The only module of the Lib that imports ``slicer``, and only inside functions, so the Lib imports without Slicer.
Works in the Slicer application and headless with slicer-core (the tests), through MRML and module-logic calls only.

Rules every writer follows:

* **Nothing existing is overwritten.** Every call creates a new node or a new segment, with a fresh name
  (``liver``, ``liver (2)``, ...). A segmentation node given by the user gains a segment; its other segments, its
  name and its geometry stay as they were.
* **Results are in RAS world coordinates.** :func:`read_volume_node` composes a linear parent transform into the
  IJK->RAS matrix, so boxes come back in world RAS and become untransformed ROI nodes; masks live on the volume's voxel
  grid, so their segmentation node observes the volume's parent transform (or the mask is transformed into a given
  segmentation node's coordinate system).
* **Provenance travels with the node** as ``M3D.*`` node attributes (segments: ``M3D.*`` segment tags), including the
  label "AI-generated, not for clinical use", which text nodes also carry in their text.
* **Nodes go where the user looks for them:** next to the volume in the subject hierarchy (same study).

Why this file is long: every read and write of MRML nodes (volumes, segments, ROIs, text, study placement) is
here, so the Slicer API details that slicer-core tests live in one file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from . import AI_LABEL
from .errors import GeometryError, InputError, M3DError
from .geometry import RasRoi
from .outputs.colors import FALLBACK_PALETTE, anatomy_color, parse_color

if TYPE_CHECKING:  # MRML classes are only named in annotations (strings), never imported at module level
    import slicer

    from .preprocessing import DisplayWindow

__all__ = [
    "AI_SEGMENTS_ATTRIBUTE",
    "EVIDENCE_COLOR_NODE",
    "SOURCE_VOLUME_REFERENCE_ROLE",
    "add_evidence_volume",
    "add_roi",
    "add_segment",
    "add_text",
    "format_text",
    "place_in_study",
    "read_volume_node",
    "roi_from_node",
    "unique_node_name",
    "unique_segment_name",
    "volume_display",
    "volume_geometry",
    "volume_signature",
]

SOURCE_VOLUME_REFERENCE_ROLE = "M3DSourceVolume"
"""Node reference role from every node we create to the volume it was computed from (saved with the scene)."""

ATTRIBUTE_PREFIX = "M3D."

AI_SEGMENTS_ATTRIBUTE = "M3D.ai_segments"
"""Segmentation node attribute: comma-separated IDs of the segments M3D added (the others are the user's)."""

MaskLike = Union[np.ndarray, Any]  # a KJI mask array, or a SegmentationResult (``.mask``, ``.target``, ``.provenance``)

EVIDENCE_COLOR_NODE = "vtkMRMLPETProceduralColorNodePET-Heat"
"""Colour table of evidence maps: black-red-yellow-white, in Slicer and slicer-core alike."""

EVIDENCE_THRESHOLD = 0.1
"""Evidence below this (of the peak) is transparent when the map is overlaid on the volume."""


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------


def _slicer():
    try:
        import slicer
    except ImportError:
        raise M3DError(
            "this needs 3D Slicer's Python (or slicer-core: pip install slicer-core); the rest of M3DAssistantLib "
            "works without it"
        ) from None
    return slicer


def headless_slicer() -> tuple[Any, dict[str, Any]]:
    """A scene with the module logics of Slicer registered, for scripts outside Slicer (PyPI ``slicer-core``).

    Also sets the ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` shims that ``slicer.util`` helpers use
    inside the application, so code written for Slicer runs unchanged. Returns ``(scene, logics)``; the logics (and
    the IO objects kept in ``logics["_keepalive"]``) must stay referenced while the scene is used.
    """
    import tempfile
    import types

    slicer = _slicer()
    from vtkmodules.vtkCommonCore import vtkCollection, vtkOutputWindow

    out = vtkOutputWindow()
    out.SetDisplayModeToAlwaysStdErr()  # VTK messages to stderr, not a window
    vtkOutputWindow.SetInstance(out)
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())
    logics: dict[str, Any] = {}
    for name, cls in [
        ("Markups", slicer.vtkSlicerMarkupsLogic),
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
        ("Texts", slicer.vtkSlicerTextsLogic),
        ("Data", slicer.vtkSlicerDataModuleLogic),
    ]:
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    # Reading .mrb files needs the remote-IO cache directory and the data IO manager.
    remote_io = slicer.vtkMRMLRemoteIOLogic()
    remote_io.SetMRMLScene(scene)
    remote_io.SetMRMLApplicationLogic(app_logic)
    remote_io.GetCacheManager().SetRemoteCacheDirectory(tempfile.mkdtemp(prefix="m3d-slicer-cache-"))
    io_logic = slicer.vtkDataIOManagerLogic()
    io_logic.SetMRMLScene(scene)
    io_logic.SetMRMLApplicationLogic(app_logic)
    io_logic.SetAndObserveDataIOManager(remote_io.GetDataIOManager())
    remote_io.AddDataIOToScene()
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        **{n: types.SimpleNamespace(logic=lambda lg=lg: lg) for n, lg in logics.items()}
    )
    logics["_keepalive"] = (app_logic, remote_io, io_logic)
    return scene, logics


def _scene_of(node: Any):
    scene = node.GetScene() if node is not None else None
    if scene is None:
        raise InputError(f"node {_name(node)!r} is not in a scene; add it to the scene first")
    return scene


def _name(node: Any) -> str:
    try:
        return node.GetName() or node.GetID() or "(unnamed)"
    except AttributeError:
        return repr(node)


def _matrix_to_numpy(vtk_matrix: Any) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _numpy_to_matrix(array: np.ndarray) -> Any:
    return _slicer().util.vtkMatrixFromArray(np.asarray(array, dtype=np.float64))


def _new_matrix() -> Any:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    return vtkMatrix4x4()


def _local_ijk_to_ras(volume_node: Any) -> np.ndarray:
    """The volume's own IJK->RAS (without parent transforms)."""
    matrix = _new_matrix()
    volume_node.GetIJKToRASMatrix(matrix)
    return _matrix_to_numpy(matrix)


def _parent_to_world(node: Any, what: str) -> Optional[np.ndarray]:
    """The 4x4 of the node's parent transforms (None when there are none); refuses non-linear ones."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return None
    if not transform_node.IsTransformToWorldLinear():
        raise GeometryError(
            f"{what} {_name(node)!r} is under the non-linear transform {_name(transform_node)!r}, which the model "
            f"cannot follow; harden the transform first (Data module: right-click the node > Harden transform) or "
            f"remove it"
        )
    matrix = _new_matrix()
    transform_node.GetMatrixTransformToWorld(matrix)
    return _matrix_to_numpy(matrix)


def _string_attributes(provenance: Any = None, attributes: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    out: dict[str, str] = {}
    if provenance is not None:
        out.update(provenance.as_node_attributes(prefix=ATTRIBUTE_PREFIX))
    out.setdefault(ATTRIBUTE_PREFIX + "label", AI_LABEL)
    for key, value in (attributes or {}).items():
        out[str(key)] = "" if value is None else str(value)
    return out


def _set_attributes(node: Any, attributes: Mapping[str, str]) -> None:
    for key, value in attributes.items():
        node.SetAttribute(key, value)


def _set_source_volume(node: Any, volume_node: Any) -> None:
    if volume_node is not None and volume_node.GetID():
        node.SetNodeReferenceID(SOURCE_VOLUME_REFERENCE_ROLE, volume_node.GetID())


def _free_name(base: str, taken: set[str]) -> str:
    """``base`` if free, else ``base (2)``, ``base (3)``, ... (compared case-insensitively)."""
    taken = {t.casefold() for t in taken}
    if base.casefold() not in taken:
        return base
    n = 2
    while f"{base} ({n})".casefold() in taken:
        n += 1
    return f"{base} ({n})"


def _clean_name(name: Optional[str], default: str) -> str:
    name = " ".join(str(name).split()) if name is not None else ""
    return name or default


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def _check_volume_node(volume_node: Any) -> None:
    if volume_node is None:
        raise InputError("no volume given; select a volume (a CT or MR image) first")
    if not hasattr(volume_node, "IsA") or not volume_node.IsA("vtkMRMLVolumeNode"):
        cls = volume_node.GetClassName() if hasattr(volume_node, "GetClassName") else type(volume_node).__name__
        raise InputError(f"{_name(volume_node)!r} is a {cls}, not a volume; select an image volume")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(
            f"{_name(volume_node)!r} is a label map; M3D needs the image itself (the CT or MR volume), not a "
            f"segmentation of it"
        )
    for cls, what in (("vtkMRMLDiffusionTensorVolumeNode", "diffusion tensor"),
                      ("vtkMRMLDiffusionWeightedVolumeNode", "diffusion-weighted (4D)"),
                      ("vtkMRMLVectorVolumeNode", "vector (e.g. RGB)"),
                      ("vtkMRMLTensorVolumeNode", "tensor")):
        if volume_node.IsA(cls):
            raise InputError(
                f"{_name(volume_node)!r} is a {what} volume; M3D needs a scalar 3D image (one value per voxel). "
                f"Extract one component or frame first (e.g. Vector to Scalar Volume)"
            )
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{_name(volume_node)!r} ({volume_node.GetClassName()}) is not a scalar image volume")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume {_name(volume_node)!r} has no voxels loaded; load the image data first")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(
            f"volume {_name(volume_node)!r} has {components} values per voxel (a vector, colour or 4D volume); M3D "
            f"needs a scalar 3D image. Pick one frame or component first"
        )
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise InputError(
            f"volume {_name(volume_node)!r} is 2D (dimensions {tuple(dims)}); M3D needs a 3D volume with at least two "
            f"voxels along every axis (load the whole series, not a single slice)"
        )


def read_volume_node(volume_node: "slicer.vtkMRMLScalarVolumeNode") -> tuple[np.ndarray, np.ndarray]:
    """A scalar volume node -> ``(array_kji, ijk_to_ras)``: a copy of its voxels and its 4x4 IJK->RAS in **world**
    coordinates (a linear parent transform is composed in; a non-linear one is refused).

    Refuses, with the fix in the message: non-volumes, label maps, vector/tensor/multi-component (4D) volumes,
    2D images, volumes without voxels, volumes under a non-linear transform.
    """
    slicer = _slicer()
    _check_volume_node(volume_node)
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    ijk_to_ras = _local_ijk_to_ras(volume_node)
    to_world = _parent_to_world(volume_node, "volume")
    if to_world is not None:
        ijk_to_ras = to_world @ ijk_to_ras
    return array, ijk_to_ras


def volume_geometry(volume_node: "slicer.vtkMRMLScalarVolumeNode") -> tuple[np.ndarray, tuple[float, float]]:
    """``(ijk_to_ras, (min, max))`` of a volume node without copying its voxels: the world IJK->RAS as
    :func:`read_volume_node` gives it, and the voxels' value range (VTK's cached scalar range) -- what
    :meth:`M3DAssistantLib.tasks.Task.preprocessing` needs to say what a task will see."""
    _check_volume_node(volume_node)
    ijk_to_ras = _local_ijk_to_ras(volume_node)
    to_world = _parent_to_world(volume_node, "volume")
    if to_world is not None:
        ijk_to_ras = to_world @ ijk_to_ras
    low, high = volume_node.GetImageData().GetScalarRange()
    return ijk_to_ras, (float(low), float(high))


DICOM_MODALITY_TAG = "0008,0060"


def volume_display(volume_node: Any) -> tuple[Optional["DisplayWindow"], Optional[str]]:
    """``(display window, modality)`` of a volume node: how the reader sees it, for the tasks whose default window
    is the display window (report, VQA, retrieval).

    * The display window is the display node's window/level (``GetLevel()``, ``GetWindow()``), whether the user set
      it or Slicer chose it automatically: it is the picture on the screen. None without a display node or with a
      width of 0.
    * The modality is the DICOM Modality of a volume loaded from DICOM: first the series' subject hierarchy attribute
      ``DICOM.Modality`` (set when the series is loaded and saved with the scene, so it survives without the DICOM
      database), else the Modality (0008,0060) of its first instance in Slicer's DICOM database (the volume's
      ``DICOM.instanceUIDs`` attribute), when that database is open. None for volumes from other files: CT is then
      recognised by its values.
    """
    from .preprocessing import DisplayWindow

    window = None
    display = volume_node.GetDisplayNode() if hasattr(volume_node, "GetDisplayNode") else None
    if display is not None and hasattr(display, "GetWindow"):
        width, level = float(display.GetWindow()), float(display.GetLevel())
        if width > 0 and np.isfinite(width) and np.isfinite(level):
            window = DisplayWindow(level, width, "Slicer")
    return window, _dicom_modality(volume_node)


def _dicom_modality(volume_node: Any) -> Optional[str]:
    slicer = _slicer()
    scene = volume_node.GetScene()
    hierarchy = scene.GetSubjectHierarchyNode() if scene is not None else None
    if hierarchy is not None:
        item = hierarchy.GetItemByDataNode(volume_node)
        name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
        value = hierarchy.GetItemAttribute(item, name) if item else ""
        if value and value.strip():
            return value.strip().upper()
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    if not uids or database is None or not getattr(database, "isOpen", False):
        return None
    try:
        value = database.instanceValue(uids[0], DICOM_MODALITY_TAG)
    except Exception:  # a DICOM database that cannot answer leaves the modality unknown
        return None
    return value.strip().upper() if value and value.strip() else None


def volume_signature(volume_node: Any) -> tuple:
    """A cheap fingerprint of a volume's voxels and world geometry, without reading the voxels.

    It changes when the voxels are replaced or modified through Slicer's APIs (the scalars' MTime), when the
    IJK->RAS matrix changes, or when a parent transform moves the volume. Used to send a volume to the model only
    when its content changed.
    """
    _check_volume_node(volume_node)
    image = volume_node.GetImageData()
    scalars = image.GetPointData().GetScalars()
    to_world = _parent_to_world(volume_node, "volume")
    return (
        volume_node.GetID(),
        image.GetAddressAsString("vtkImageData"),
        scalars.GetAddressAsString("vtkDataArray"),
        image.GetMTime(),
        scalars.GetMTime(),
        tuple(image.GetDimensions()),
        _local_ijk_to_ras(volume_node).tobytes(),
        None if to_world is None else to_world.tobytes(),
    )


def roi_from_node(roi_node: "slicer.vtkMRMLMarkupsROINode") -> RasRoi:
    """A markups ROI (axis-aligned or rotated, under a linear transform or not) -> :class:`RasRoi` in world RAS."""
    if roi_node is None or not hasattr(roi_node, "IsA") or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise InputError(f"{_name(roi_node)!r} is not an ROI markup; draw a box with Markups > ROI first")
    _parent_to_world(roi_node, "ROI")  # refuses non-linear transforms
    center = np.zeros(3)
    roi_node.GetCenterWorld(center)
    size = np.zeros(3)
    roi_node.GetSizeWorld(size)
    axes = np.zeros((3, 3))
    for c, getter in enumerate((roi_node.GetXAxisWorld, roi_node.GetYAxisWorld, roi_node.GetZAxisWorld)):
        axis = np.zeros(3)
        getter(axis)
        axes[:, c] = axis
    if not np.any(size > 0):
        raise GeometryError(f"the ROI {_name(roi_node)!r} has not been placed yet (size 0); draw it first")
    try:
        return RasRoi(center=center, size=size, axes=axes)
    except GeometryError as e:
        raise GeometryError(f"ROI {_name(roi_node)!r}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Names, subject hierarchy
# ----------------------------------------------------------------------------------------------------------------------


def unique_node_name(scene: Any, base: str, class_name: str = "vtkMRMLNode") -> str:
    """``base``, or ``base (2)``, ``base (3)``, ... : a name no node of ``class_name`` in the scene has yet."""
    nodes = scene.GetNodesByClass(class_name)
    taken = {nodes.GetItemAsObject(i).GetName() or "" for i in range(nodes.GetNumberOfItems())}
    return _free_name(base, taken)


def unique_segment_name(segmentation_node: Any, base: str) -> str:
    """A segment name not used yet in the segmentation node: ``liver``, ``liver (2)``, ..."""
    segmentation = segmentation_node.GetSegmentation()
    taken = {segmentation.GetNthSegment(i).GetName() or "" for i in range(segmentation.GetNumberOfSegments())}
    return _free_name(base, taken)


def place_in_study(node: Any, volume_node: Any) -> None:
    """Put ``node`` next to ``volume_node`` in the subject hierarchy (same parent: usually the study).

    Nothing happens when the volume has no subject hierarchy item (e.g. hidden from editors)."""
    if node is None or volume_node is None or node.GetScene() is None:
        return
    slicer = _slicer()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if sh is None:
        return
    volume_item = sh.GetItemByDataNode(volume_node)
    if not volume_item:
        return
    parent = sh.GetItemParent(volume_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


# ----------------------------------------------------------------------------------------------------------------------
# Segments
# ----------------------------------------------------------------------------------------------------------------------


def _segment_color(segmentation_node: Any, name: str, color: Any) -> tuple[float, float, float]:
    if color is not None:
        return parse_color(color, "segment colour")
    anatomical = anatomy_color(name)
    if anatomical is not None:
        return anatomical
    segmentation = segmentation_node.GetSegmentation()
    used = {tuple(round(v * 255) for v in segmentation.GetNthSegment(i).GetColor())
            for i in range(segmentation.GetNumberOfSegments())}
    free = [c for c in FALLBACK_PALETTE if c not in used] or list(FALLBACK_PALETTE)
    return tuple(v / 255.0 for v in free[0])  # type: ignore[return-value]


def _tag_value(value: str) -> str:
    # Segment tags are stored as "key:value|key:value|" in .seg.nrrd files; a "|" would split the value.
    return value.replace("|", "/")


def _oriented_mask(mask: np.ndarray, ijk_to_ras: np.ndarray) -> Any:
    """uint8 KJI mask on a grid -> vtkOrientedImageData with that grid's IJK->RAS."""
    slicer = _slicer()
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonCore import VTK_UNSIGNED_CHAR

    image = slicer.vtkOrientedImageData()
    k, j, i = mask.shape
    image.SetDimensions(i, j, k)
    image.AllocateScalars(VTK_UNSIGNED_CHAR, 1)
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)
    voxels[:] = mask != 0
    image.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras))
    return image


def add_segment(
    result_or_mask: MaskLike,
    volume_node: "slicer.vtkMRMLScalarVolumeNode",
    name: Optional[str] = None,
    segmentation_node: Optional["slicer.vtkMRMLSegmentationNode"] = None,
    color: Any = None,
    attributes: Optional[Mapping[str, Any]] = None,
) -> tuple["slicer.vtkMRMLSegmentationNode", str]:
    """Add a mask as a NEW segment; return ``(segmentation_node, segment_id)``.

    :param result_or_mask: a :class:`~.results.SegmentationResult` (its mask, target name and provenance are used) or
        a binary mask in (K, J, I) order on the volume's voxel grid (nonzero = inside).
    :param volume_node: the volume the mask was computed on (its grid, transform and study are used).
    :param name: segment name (default: the result's target); made unique in the node (``liver (2)``).
    :param segmentation_node: add to this node; None creates a new one whose reference geometry is the volume, under
        the volume's parent transform and next to it in the subject hierarchy. Existing segments are never touched.
    :param color: RGB (0-1 or 0-255) or ``"#rrggbb"``; default: Slicer's anatomical colour for common structures,
        else a palette colour not used yet in the node.
    :param attributes: extra ``key: value`` attributes.

    Provenance (and ``attributes``) become ``M3D.*`` tags of the segment, and attributes of the segmentation node
    when this call created it; :data:`AI_SEGMENTS_ATTRIBUTE` of the node lists the segments M3D added.
    :raises InputError: no mask, an empty mask, or a mask whose shape is not the volume's.
    """
    slicer = _slicer()
    mask = getattr(result_or_mask, "mask", result_or_mask)
    provenance = getattr(result_or_mask, "provenance", None)
    if name is None:
        name = getattr(result_or_mask, "target", None)
    if mask is None:
        raise InputError("there is no mask to add (the model found no target); nothing was created")
    mask = np.asarray(mask)
    _check_volume_node(volume_node)
    shape_kji = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    if mask.shape != shape_kji:
        raise InputError(
            f"the mask has shape {mask.shape} but volume {_name(volume_node)!r} has {shape_kji} (K, J, I); a mask "
            f"must be on the grid of the volume it was computed from"
        )
    if not np.any(mask):
        raise InputError("the mask is empty (no voxel inside); nothing was created")
    scene = _scene_of(volume_node)
    name = _clean_name(name, "M3D segment")

    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode",
            unique_node_name(scene, f"{_name(volume_node)} M3D segmentation", "vtkMRMLSegmentationNode"))
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        if volume_node.GetTransformNodeID():
            segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        segmentation_node.CreateDefaultDisplayNodes()
        _set_source_volume(segmentation_node, volume_node)
        place_in_study(segmentation_node, volume_node)
    elif not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError(f"{_name(segmentation_node)!r} is not a segmentation node")
    segmentation = segmentation_node.GetSegmentation()
    source = segmentation.GetSourceRepresentationName()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if source != binary:
        raise InputError(
            f"segmentation {_name(segmentation_node)!r} is edited as {source!r}, not as a binary labelmap; choose "
            f"another segmentation node or none (a new one is created)"
        )
    if not segmentation_node.GetDisplayNode():
        segmentation_node.CreateDefaultDisplayNodes()

    segment_name = unique_segment_name(segmentation_node, name)
    rgb = _segment_color(segmentation_node, name, color)
    segment_id = segmentation.AddEmptySegment(segmentation.GenerateUniqueSegmentID(name), segment_name, list(rgb))
    segment = segmentation.GetSegment(segment_id)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)

    image = _oriented_mask(mask, _local_ijk_to_ras(volume_node))
    to_segmentation = None
    if (volume_node.GetTransformNodeID() or "") != (segmentation_node.GetTransformNodeID() or ""):
        from vtkmodules.vtkCommonTransforms import vtkGeneralTransform

        to_segmentation = vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
            volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(), to_segmentation)
    ids = _string_array([segment_id])
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if to_segmentation is not None:
        imported = logic.ImportLabelmapToSegmentationNode(image, segmentation_node, ids, to_segmentation)
    else:
        imported = logic.ImportLabelmapToSegmentationNode(image, segmentation_node, ids)
    if not imported:
        segmentation.RemoveSegment(segment_id)
        if created:
            scene.RemoveNode(segmentation_node)
        raise M3DError(f"Slicer could not import the mask into segmentation {_name(segmentation_node)!r}")
    # Import resets name and colour from the ID for a new segment only; ours exists, but keep them explicit.
    segment.SetName(segment_name)
    segment.SetColor(*rgb)

    values = _string_attributes(provenance, attributes)
    for key, value in values.items():
        segment.SetTag(key, _tag_value(value))
    if created:  # a user's node may hold their own segments: it is not labelled AI-generated as a whole
        _set_attributes(segmentation_node, values)
    ai_segments = [s for s in (segmentation_node.GetAttribute(AI_SEGMENTS_ATTRIBUTE) or "").split(",") if s]
    segmentation_node.SetAttribute(AI_SEGMENTS_ATTRIBUTE, ",".join([*ai_segments, segment_id]))
    return segmentation_node, segment_id


def _string_array(values: Sequence[str]) -> Any:
    from vtkmodules.vtkCommonCore import vtkStringArray

    array = vtkStringArray()
    for v in values:
        array.InsertNextValue(v)
    return array


# ----------------------------------------------------------------------------------------------------------------------
# ROI and text
# ----------------------------------------------------------------------------------------------------------------------


def add_roi(
    box_result_or_roi: Any,
    name: Optional[str] = None,
    attributes: Optional[Mapping[str, Any]] = None,
    volume_node: Any = None,
    scene: Any = None,
) -> "slicer.vtkMRMLMarkupsROINode":
    """A NEW ``vtkMRMLMarkupsROINode`` for a box, in world RAS, rotated as the box (oblique volumes).

    :param box_result_or_roi: a :class:`~.results.BoxResult` (its ``roi``, target and provenance are used) or a
        :class:`~.geometry.RasRoi`.
    :param name: node name (default: the result's target), made unique among ROI nodes.
    :param volume_node: the volume the box was found in: gives the scene, the subject hierarchy place and a node
        reference. Without it give ``scene`` (default ``slicer.mrmlScene``).
    :raises InputError: a result without a box (the model found none): no node is made up.
    """
    slicer = _slicer()
    roi = getattr(box_result_or_roi, "roi", box_result_or_roi)
    provenance = getattr(box_result_or_roi, "provenance", None)
    if name is None:
        name = getattr(box_result_or_roi, "target", None)
    if roi is None:
        raise InputError("there is no box to add (the model found none); nothing was created")
    if not isinstance(roi, RasRoi):
        raise InputError(f"expected a BoxResult or RasRoi, got {type(roi).__name__}")
    if volume_node is not None:
        scene = _scene_of(volume_node)
    scene = scene or slicer.mrmlScene
    axes = np.array(roi.axes, dtype=np.float64)
    if np.linalg.det(axes) < 0:
        axes[:, 2] = -axes[:, 2]  # a box is symmetric: flipping one edge direction makes the frame a rotation
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = axes
    object_to_node[:3, 3] = roi.center

    node = scene.AddNewNodeByClass(
        "vtkMRMLMarkupsROINode", unique_node_name(scene, _clean_name(name, "M3D box"), "vtkMRMLMarkupsROINode"))
    node.SetROIType(slicer.vtkMRMLMarkupsROINode.ROITypeBox)
    node.GetObjectToNodeMatrix().DeepCopy(_numpy_to_matrix(object_to_node))
    node.SetSize(*[float(v) for v in roi.size])
    node.CreateDefaultDisplayNodes()
    _set_attributes(node, _string_attributes(provenance, attributes))
    _set_source_volume(node, volume_node)
    place_in_study(node, volume_node)
    return node


def format_text(text_result: Any) -> str:
    """The text a text node shows: the AI label first, then the answer (the chosen option for a choice)."""
    text = str(getattr(text_result, "text", text_result) or "").strip()
    letter, choice = getattr(text_result, "letter", None), getattr(text_result, "choice", None)
    if letter and choice:
        text = f"{letter}. {choice}" + (f"\n\n(model output: {text})" if text and text != f"{letter}. {choice}" else "")
    return f"[{AI_LABEL}]\n\n{text}\n"


def add_text(
    text_result: Any,
    name: Optional[str] = None,
    attributes: Optional[Mapping[str, Any]] = None,
    volume_node: Any = None,
    scene: Any = None,
) -> "slicer.vtkMRMLTextNode":
    """A NEW ``vtkMRMLTextNode`` with the answer, labelled "AI-generated, not for clinical use", provenance as
    attributes, saved as a .txt file with the scene. ``text_result``: a TextResult/ChoiceResult or a string.

    :param name: node name (default: the task, e.g. "M3D report"), made unique among text nodes.
    """
    slicer = _slicer()
    provenance = getattr(text_result, "provenance", None)
    if name is None:
        task = getattr(provenance, "task", None)
        name = f"M3D {task}" if task else "M3D answer"
    if volume_node is not None:
        scene = _scene_of(volume_node)
    scene = scene or slicer.mrmlScene
    node = scene.AddNewNodeByClass(
        "vtkMRMLTextNode", unique_node_name(scene, _clean_name(name, "M3D answer"), "vtkMRMLTextNode"))
    node.SetText(format_text(text_result))
    node.SetForceCreateStorageNode(slicer.vtkMRMLTextNode.CreateStorageNodeAlways)
    _set_attributes(node, _string_attributes(provenance, attributes))
    _set_source_volume(node, volume_node)
    place_in_study(node, volume_node)
    return node


# ----------------------------------------------------------------------------------------------------------------------
# Evidence maps
# ----------------------------------------------------------------------------------------------------------------------


def add_evidence_volume(
    result_or_evidence: Any,
    volume_node: "slicer.vtkMRMLScalarVolumeNode",
    name: Optional[str] = None,
    attributes: Optional[Mapping[str, Any]] = None,
) -> "slicer.vtkMRMLScalarVolumeNode":
    """A NEW scalar volume node with an evidence map (:class:`~.results.EvidenceMap`, or a result carrying one) on
    ``volume_node``'s own voxel grid: same IJK->RAS, same parent transform, values in [-1, 1] (1 = the strongest
    evidence). Displayed in a heat colour table over [0, 1] with values below :data:`EVIDENCE_THRESHOLD`
    transparent, so that overlaid on the volume (as the slice views' foreground) it shows where the answer comes
    from. The slice ranges of the map are attributes (``M3D.evidence_ranges``).

    :raises InputError: no evidence map, or one computed on another grid.
    """
    slicer = _slicer()
    evidence = getattr(result_or_evidence, "evidence", result_or_evidence)
    provenance = getattr(result_or_evidence, "provenance", None)
    if evidence is None or not hasattr(evidence, "on_volume"):
        raise InputError("there is no evidence map to add (ask for one with evidence=True); nothing was created")
    _check_volume_node(volume_node)
    shape_kji = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    if tuple(evidence.mapping.volume_shape) != shape_kji:
        raise InputError(f"the evidence map belongs to a volume of shape {tuple(evidence.mapping.volume_shape)} but "
                         f"{_name(volume_node)!r} has {shape_kji} (K, J, I); add it to the volume it was computed on")
    scene = _scene_of(volume_node)
    base = _clean_name(name, f"{_name(volume_node)} M3D evidence")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", unique_node_name(scene, base, "vtkMRMLScalarVolumeNode"))
    node.SetIJKToRASMatrix(_numpy_to_matrix(_local_ijk_to_ras(volume_node)))
    slicer.util.updateVolumeFromArray(node, evidence.on_volume())
    if volume_node.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if scene.GetNodeByID(EVIDENCE_COLOR_NODE) is not None:
        display.SetAndObserveColorNodeID(EVIDENCE_COLOR_NODE)
    display.AutoWindowLevelOff()
    display.SetWindowLevel(1.0, 0.5)  # 0 .. 1: supporting evidence; negative values stay in the data
    display.SetThreshold(EVIDENCE_THRESHOLD, 1.0)
    display.ApplyThresholdOn()
    ranges = "; ".join(f"K {r.start}-{r.stop - 1} ({100 * r.share:.0f}%)" for r in evidence.ranges)
    extra = {ATTRIBUTE_PREFIX + "evidence_method": f"{evidence.method} ({evidence.steps} steps)",
             ATTRIBUTE_PREFIX + "evidence_ranges": ranges, **(attributes or {})}
    _set_attributes(node, _string_attributes(provenance, extra))
    _set_source_volume(node, volume_node)
    place_in_study(node, volume_node)
    return node
