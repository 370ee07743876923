"""Zoom-in refinement: the region around a first mask, the crop through the geometry code and the paste back, with
oracle decoders (exact geometry whatever the orientation), then through the engine with the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from M3DAssistantLib.errors import InputError
from M3DAssistantLib.geometry import logits_to_mask, to_model_input
from M3DAssistantLib.refinement import MIN_MARGIN_VOXELS, refine_logits, zoom_region
from M3DAssistantLib.results import AnalysisOptions, SamplingOptions
from M3DAssistantLib.selfcheck import dice

MODEL_SHAPE = (16, 32, 32)  # coarse on purpose: a 16 mm sphere spans only a few model voxels at first


def test_zoom_region_grows_the_mask_box_and_stays_in_view():
    mask = np.zeros((40, 50, 60), np.uint8)
    mask[10:14, 20:30, 5:6] = 1  # extents 4, 10, 1
    start, stop = zoom_region(mask, ((0, 0, 0), (40, 50, 60)), margin=0.25)
    assert start == (10 - MIN_MARGIN_VOXELS, 20 - 4, 5 - MIN_MARGIN_VOXELS)  # ceil(0.25 * 10) = 3 < 4 voxels
    assert stop == (14 + MIN_MARGIN_VOXELS, 30 + 4, 6 + MIN_MARGIN_VOXELS)
    start, stop = zoom_region(mask, ((0, 0, 0), (40, 50, 60)), margin=1.0)
    assert start == (6, 10, 1) and stop == (18, 40, 10)
    start, stop = zoom_region(mask, ((11, 0, 3), (40, 50, 60)), margin=1.0)  # clipped to what the model saw
    assert start == (11, 10, 3)
    with pytest.raises(InputError, match="empty"):
        zoom_region(np.zeros_like(mask), ((0, 0, 0), (40, 50, 60)))
    with pytest.raises(InputError, match="margin"):
        zoom_region(mask, ((0, 0, 0), (40, 50, 60)), margin=-1)


def oriented(shape_kji, spacing, perm, flips):
    """An IJK->RAS with permuted, flipped axes and anisotropic spacing (a volume stored any way round)."""
    matrix = np.zeros((4, 4))
    matrix[3, 3] = 1.0
    for c, (r, f) in enumerate(zip(perm, flips)):
        matrix[r, c] = spacing[c] * (-1.0 if f else 1.0)
    matrix[:3, 3] = (-40.0, 25.0, 100.0)
    return matrix


def sphere_phantom(ijk_to_ras, shape_kji, centre_ras, radius_mm):
    """A bright sphere (1000) on a dim body (-300) with an air border (-1000): the voxels, and the true mask."""
    k, j, i = np.indices(shape_kji)
    ras = np.tensordot(ijk_to_ras[:3, :3], np.stack([i, j, k]).astype(float), axes=1) + ijk_to_ras[:3, 3, None, None,
                                                                                                    None]
    inside = np.linalg.norm(ras - np.asarray(centre_ras)[:, None, None, None], axis=0) <= radius_mm
    array = np.full(shape_kji, -300, np.int16)
    array[[0, -1]] = -1000
    array[inside] = 1000
    return array, inside.astype(np.uint8)


def threshold_decoder(tensor, mapping):
    """An oracle SegVol: the sphere is what is bright in the tensor it is shown (logit 0 halfway between the body
    and the sphere)."""
    return (tensor[0] - 0.675) * 40.0


CASES = [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True)), ((1, 2, 0), (False, True, False))]


@pytest.mark.parametrize("perm,flips", CASES)
def test_an_oracle_refinement_lands_on_the_phantom_at_the_finer_resolution(perm, flips):
    """Whatever the storage order, the zoomed region is read from the right voxels and the mask pasted back where
    the sphere is: the refined mask matches the true one much better than the coarse one, and the region was seen
    at a finer resolution."""
    shape = (40, 64, 56)
    spacing = (1.5, 1.2, 2.0)
    ijk_to_ras = oriented(shape, spacing, perm, flips)
    centre = (ijk_to_ras @ [20.0, 30.0, 22.0, 1.0])[:3]
    array, truth = sphere_phantom(ijk_to_ras, shape, centre, radius_mm=8.0)
    tensor, coarse_mapping = to_model_input(array, ijk_to_ras, window="minmax", model_shape=MODEL_SHAPE)
    coarse = logits_to_mask(threshold_decoder(tensor, coarse_mapping), coarse_mapping)
    logits, mapping, record = refine_logits(array, ijk_to_ras, coarse, coarse_mapping, threshold_decoder)
    refined = logits_to_mask(logits, mapping)

    assert dice(refined, truth) > 0.98 and dice(refined, truth) > dice(coarse, truth) + 0.04
    outside = np.ones(shape, bool)
    outside[tuple(slice(a, b) for a, b in zip(record.start, record.stop))] = False
    assert not refined[outside].any()  # pasted inside the region only
    lo, hi = np.argwhere(truth).min(axis=0), np.argwhere(truth).max(axis=0)
    assert all(s <= a and b < e for s, e, a, b in zip(record.start, record.stop, lo, hi))  # the region holds it
    assert np.all(np.asarray(record.zoom) > 1.5)
    np.testing.assert_allclose(coarse_mapping.model_spacing / mapping.model_spacing, record.zoom, rtol=1e-3)
    assert mapping.intensity == coarse_mapping.intensity and mapping.convention == coarse_mapping.convention
    assert record.coarse_voxel_count == int(coarse.sum()) and record.mapping is mapping


def ras_sphere_decoder(centre_ras, radius_mm):
    """An oracle that never looks at the image: the logit at each model voxel centre is its distance inside the
    sphere, computed from the mapping's model->RAS affine (so only the geometry decides where the mask lands)."""
    def decode(tensor, mapping):
        d, h, w = np.indices(mapping.model_shape).astype(float)
        points = np.tensordot(mapping.model_to_ras[:3, :3], np.stack([d, h, w]), axes=1)
        points += mapping.model_to_ras[:3, 3, None, None, None]
        return radius_mm - np.linalg.norm(points - np.asarray(centre_ras)[:, None, None, None], axis=0)
    return decode


@pytest.mark.parametrize("perm,flips", CASES[:2])
def test_a_geometric_oracle_pastes_exactly_where_the_sphere_is(perm, flips):
    """With the RAS oracle the refined mask is the sphere voxelised on the CT grid up to a boundary voxel, and its
    centroid is the sphere's centre: crop and paste are exact inverses."""
    shape = (36, 48, 40)
    ijk_to_ras = oriented(shape, (1.0, 0.8, 2.5), perm, flips)
    centre = (ijk_to_ras @ [17.3, 24.6, 19.1, 1.0])[:3]
    array, truth = sphere_phantom(ijk_to_ras, shape, centre, radius_mm=6.0)
    decode = ras_sphere_decoder(centre, 6.0)
    tensor, coarse_mapping = to_model_input(array, ijk_to_ras, window="minmax", model_shape=MODEL_SHAPE)
    coarse = logits_to_mask(decode(tensor, coarse_mapping), coarse_mapping)
    logits, mapping, _ = refine_logits(array, ijk_to_ras, coarse, coarse_mapping, decode)
    refined = logits_to_mask(logits, mapping)
    assert dice(refined, truth) > 0.95
    assert np.count_nonzero(refined != truth) <= 0.25 * truth.sum()
    kji = np.argwhere(refined).mean(axis=0)
    centroid = (ijk_to_ras @ np.append(kji[::-1], 1.0))[:3]
    assert np.linalg.norm(centroid - centre) < 0.5  # mm


def test_the_region_stays_inside_an_roi_crop():
    """With an ROI crop the model never saw outside it, so the zoomed region stays inside it too."""
    from M3DAssistantLib.geometry import RasRoi

    shape = (30, 40, 40)
    ijk_to_ras = oriented(shape, (1.0, 1.0, 1.0), (0, 1, 2), (False, False, False))
    centre = (ijk_to_ras @ [20.0, 20.0, 15.0, 1.0])[:3]
    array, truth = sphere_phantom(ijk_to_ras, shape, centre, radius_mm=6.0)
    lo = (ijk_to_ras @ [12.0, 0.0, 0.0, 1.0])[:3]
    hi = (ijk_to_ras @ [39.0, 39.0, 29.0, 1.0])[:3]
    tensor, coarse_mapping = to_model_input(array, ijk_to_ras, window="minmax", model_shape=MODEL_SHAPE,
                                            roi=RasRoi.from_bounds(lo, hi))
    coarse = logits_to_mask(threshold_decoder(tensor, coarse_mapping), coarse_mapping)
    _, mapping, record = refine_logits(array, ijk_to_ras, coarse, coarse_mapping, threshold_decoder, margin=3.0)
    assert all(a >= b for a, b in zip(record.start, coarse_mapping.crop_start))
    assert all(a <= b for a, b in zip(record.stop, coarse_mapping.crop_stop))
    assert mapping.crop_start == record.start and mapping.crop_stop == record.stop


# ------------------------------------------------------------------------------------------------- the engine
def test_the_engine_refines_with_the_same_seg_prompt(engine):
    """Forced [SEG]: the engine's zoom-in runs SegVol once more on the region, with the prompt of the answer; the
    result records it, the provenance says so, and the mask equals the region's logits pasted back."""
    import torch
    from forcing import forced_answer

    with forced_answer(engine, " It is [SEG]."):
        plain = engine.segment("liver", sampling=SamplingOptions(max_new_tokens=8))
        refined = engine.segment("liver", sampling=SamplingOptions(max_new_tokens=8),
                                 analysis=AnalysisOptions(refine=True))
    assert plain.refinement is None and plain.voxel_count > 0
    record = refined.refinement
    assert record is not None and record.coarse_voxel_count == plain.voxel_count
    assert engine.counters["seg_encoder_zoom"] == 1
    assert any("refined by zoom-in" in note for note in refined.provenance.notes)
    assert refined.provenance.analysis["refine"] is True

    # the same computation by hand: SegVol on the region's tensor with the [SEG] prompt of a fresh generation
    from M3DAssistantLib.geometry import region_to_model_input

    volume = engine._volume()
    tensor, mapping = region_to_model_input(
        volume.array, volume.ijk_to_ras, record.start, record.stop, intensity=record.mapping.intensity_mapping,
        model_shape=engine.model_shape, convention=record.mapping.convention)
    assert mapping == record.mapping
    view = engine._view("segment")
    with forced_answer(engine, " It is [SEG]."):
        out = engine._generate(view, refined.provenance.prompt, SamplingOptions(max_new_tokens=8),
                               True, None, seg_prompt=True)
    seg = engine.model.model.seg_module
    with torch.no_grad():
        logits = seg.decode(seg.encode_image(torch.from_numpy(tensor)[None]), out["seg_prompts"])
    np.testing.assert_array_equal(refined.mask, logits_to_mask(logits[0, 0].numpy(), mapping))


def test_refine_without_a_mask_is_a_no_op(engine):
    """case: refinement asked for but the model gave no mask (random weights write no [SEG]) -> no refinement, no
    error, nothing recorded (the unforced twin of the engine test)"""
    result = engine.segment("liver", sampling=SamplingOptions(max_new_tokens=4), analysis=AnalysisOptions(refine=True))
    if "[SEG]" not in result.text:
        assert result.mask is None and result.refinement is None
    assert engine.counters["seg_encoder_zoom"] == (1 if result.voxel_count else 0)


def test_refine_is_refused_where_there_is_no_mask():
    from M3DAssistantLib.tasks import ASK, SEGMENT

    with pytest.raises(InputError, match="does not take the option"):
        ASK.check_analysis(AnalysisOptions(refine=True))
    assert SEGMENT.check_analysis(AnalysisOptions(refine=True, locate=True)).refine


def test_zoom_region_property_on_random_masks():
    """Any non-empty mask: the region holds it whole and stays within bounds."""
    rng = np.random.default_rng(3)
    for _ in range(25):
        shape = tuple(int(v) for v in rng.integers(5, 30, 3))
        mask = np.zeros(shape, np.uint8)
        for _ in range(3):
            point = tuple(int(rng.integers(0, s)) for s in shape)
            mask[point] = 1
        start, stop = zoom_region(mask, ((0, 0, 0), shape), margin=float(rng.uniform(0, 1)))
        where = np.argwhere(mask)
        assert all(0 <= a <= lo and hi < b <= s for a, b, lo, hi, s in
                   zip(start, stop, where.min(axis=0), where.max(axis=0), shape))
