"""retrieval: rankings against an independent cosine computation, the embedding cache, the official recall@k, errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from M3DAssistantLib import AI_LABEL
from M3DAssistantLib.errors import GeometryError, InputError
from M3DAssistantLib.geometry import to_model_input
from M3DAssistantLib.retrieval import Retriever, recall_at_k, volume_key

TEXTS = [
    "The liver is enlarged with multiple hypodense lesions.",
    "No acute intracranial abnormality.",
    "Right lower lobe consolidation with a small pleural effusion.",
    "Kidney stone in the left renal pelvis.",
    "Normal chest CT.",
]
AFFINE = np.array([[-0.8, 0, 0, 120.0], [0, -0.8, 0, 95.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])


def make_volume(seed: int, shape=(12, 40, 48)) -> np.ndarray:
    """A CT-like int16 volume: air background, a body ellipse of soft tissue, a bright blob and noise."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    volume = np.full(shape, -1000.0)
    volume[(j / 0.8) ** 2 + (i / 0.9) ** 2 < 1] = 40.0
    centre = rng.uniform(-0.4, 0.4, 3)
    volume[((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2) < 0.1] = rng.uniform(200, 900)
    volume += rng.normal(0, 20, shape)
    return volume.astype(np.int16)


@pytest.fixture(scope="module")
def retriever(tiny_clip) -> Retriever:
    """The tiny random M3D-CLIP, made discriminative.

    Randomly initialised BERT/ViT give nearly the same [CLS] for every input (cosines between two texts' embeddings
    round to 1.000), so every ranking would be a near-tie. Scaling the residual branches lets the input's content
    reach the CLS token: score gaps become ~1e-2, far above the 1e-5 tolerance of the comparisons below.
    """
    retriever = Retriever(tiny_clip, device="cpu", dtype="float32")
    model = retriever.model
    with torch.no_grad():
        for layer in model.language_encoder.encoder.layer:
            layer.attention.output.dense.weight.mul_(30)
            layer.output.dense.weight.mul_(30)
        for block in model.vision_encoder.blocks:
            block.attn.out_proj.weight.mul_(30)
            block.mlp.linear2.weight.mul_(30)
        model.mm_language_proj.bias.zero_()
        model.mm_vision_proj.bias.zero_()
    return retriever


@pytest.fixture(scope="module")
def volumes() -> list[tuple[np.ndarray, np.ndarray]]:
    return [(make_volume(seed), AFFINE) for seed in range(3)]


def direct_image_embedding(retriever: Retriever, array, affine, window="abdomen") -> torch.Tensor:
    """Geometry + encode_image called here, without the Retriever. The default window is retrieval's default for
    these CTs, which have no display window: the abdomen preset (M3D-CLIP learned from M3D-Cap's display-window
    images; docs/conventions.md)."""
    image, _ = to_model_input(array, affine, window=window, model_shape=retriever.model.config.img_size,
                              convention="m3d-cap-v2")
    with torch.no_grad():
        return retriever.model.encode_image(torch.from_numpy(image)[None])[0]


def direct_text_embeddings(retriever: Retriever, texts) -> torch.Tensor:
    # Padding to the longest text (the Retriever pads to max_text_len, as the official code): same embeddings.
    batch = retriever.tokenizer(texts, padding=True, truncation=True, max_length=retriever.model.config.max_text_len,
                                return_tensors="pt")
    with torch.no_grad():
        return retriever.model.encode_text(batch["input_ids"], batch["attention_mask"])


def assert_ranking_consistent(ranking, expected_scores, labels):
    """Every candidate once, scores equal to the independent cosine, best first."""
    assert sorted(index for index, _, _ in ranking) == list(range(len(expected_scores)))
    for index, label, score in ranking:
        assert label == labels[index]
        assert score == pytest.approx(float(expected_scores[index]), abs=1e-5)
    scores = [score for _, _, score in ranking]
    assert all(a >= b for a, b in itertools.pairwise(scores))
    # The order is a real one (no near-ties that rounding could flip), so it must be exactly the independent one.
    expected = np.asarray(expected_scores, dtype=np.float64)
    assert np.min(np.diff(np.sort(expected))) > 1e-4
    assert [index for index, _, _ in ranking] == list(np.argsort(-expected))


# ------------------------------------------------------------------------------------------------------------ ranking


def test_rank_texts_matches_independent_cosine(retriever, volumes):
    array, affine = volumes[0]
    image = direct_image_embedding(retriever, array, affine, window="abdomen")
    expected = F.cosine_similarity(image[None], direct_text_embeddings(retriever, TEXTS), dim=-1)
    result = retriever.rank_texts((array, affine), TEXTS, window="abdomen")
    assert_ranking_consistent(result.ranking, expected, TEXTS)
    assert result.query.startswith("volume 12x40x48 (KJI) #")


def test_rank_volumes_matches_independent_cosine(retriever, volumes):
    text = TEXTS[0]
    images = torch.stack([direct_image_embedding(retriever, a, m) for a, m in volumes])
    expected = F.cosine_similarity(images, direct_text_embeddings(retriever, [text]), dim=-1)
    labels = ["CT A", "CT B", "CT C"]
    result = retriever.rank_volumes(text, volumes, labels)
    assert_ranking_consistent(result.ranking, expected, labels)
    assert result.query == text
    # Precomputed embeddings (even unnormalised) rank exactly as the volumes they came from.
    mixed = [volumes[0], retriever.embed_volume(*volumes[1]) * 3.0, volumes[2]]
    again = retriever.rank_volumes(text, mixed, labels)
    assert [i for i, _, _ in again.ranking] == [i for i, _, _ in result.ranking]
    np.testing.assert_allclose([s for *_, s in again.ranking], [s for *_, s in result.ranking], atol=1e-6)


def test_embeddings_are_unit_vectors_and_similarity_matrix(retriever, volumes):
    texts = TEXTS[:3]
    text_embeddings = retriever.embed_texts(texts)
    assert text_embeddings.shape == (3, retriever.model.config.hidden_size) and text_embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(text_embeddings, axis=1), 1.0, atol=1e-5)
    # batching does not change anything
    np.testing.assert_allclose(retriever.embed_texts(texts, batch_size=1), text_embeddings, atol=1e-6)
    sim = retriever.similarity(volumes, texts)
    expected = np.stack([retriever.embed_volume(a, m) for a, m in volumes]) @ text_embeddings.T
    np.testing.assert_allclose(sim, expected, atol=1e-6)
    assert set(recall_at_k(sim, ks=(1, 3))) == {"image_to_text@1", "image_to_text@3", "text_to_image@1",
                                                "text_to_image@3"}


def test_long_text_is_truncated_to_max_text_len(retriever):
    long_text = " ".join(["liver lesion with contrast enhancement"] * 200)  # far beyond max_text_len tokens
    truncated = retriever.tokenizer(long_text, truncation=True, max_length=retriever.model.config.max_text_len)
    expected = direct_text_embeddings(retriever, [retriever.tokenizer.decode(truncated["input_ids"][1:-1])])
    np.testing.assert_allclose(retriever.embed_texts([long_text]), expected.numpy(), atol=1e-5)


def test_provenance_and_json(retriever, volumes, tiny_clip):
    result = retriever.rank_volumes("liver lesion", volumes[:2], window="abdomen")
    p = result.provenance
    assert (p.task, p.model, p.dtype, p.device, p.label) == ("retrieval", str(tiny_clip), "float32", "cpu", AI_LABEL)
    assert p.prompt == "liver lesion" and p.convention == "m3d-cap-v2" and p.time and p.duration_s >= 0
    assert json.loads(p.intensity)["name"] == "abdomen"  # the same fixed window for both volumes
    data = json.loads(json.dumps(result.to_dict()))
    assert data["task"] == "retrieval" and [r["label"] for r in data["ranking"]] in (
        ["volume 0", "volume 1"], ["volume 1", "volume 0"])
    texts = retriever.rank_texts(volumes[0], TEXTS[:2], labels=["a", "b"], query="patient 7")
    assert texts.query == "patient 7" and json.loads(texts.provenance.prompt) == TEXTS[:2]
    assert {label for _, label, _ in texts.ranking} == {"a", "b"}


def test_default_window_is_each_volumes_display_window(retriever, volumes):
    """Retrieval's default window (registry: FIND_SIMILAR.window, the display window, as report/VQA): a volume's own
    display window when given, else the abdomen preset for CT, else (no CT values, no window) the M3D-Seg
    percentiles; per volume in a ranking of volumes. Each checked against the embedding of the explicit window."""
    from M3DAssistantLib.preprocessing import DisplayWindow
    from M3DAssistantLib.tasks import FIND_SIMILAR

    assert FIND_SIMILAR.window == "display" and FIND_SIMILAR.convention == "m3d-cap-v2"
    (ct, affine), (other, _), _ = volumes
    lung = DisplayWindow(-600, 1500, "Slicer")
    np.testing.assert_array_equal(retriever.embed_volume(ct, affine, display_window=lung),
                                  retriever.embed_volume(ct, affine, window=lung))
    np.testing.assert_array_equal(retriever.embed_volume(ct, affine), retriever.embed_volume(ct, affine,
                                                                                           window="abdomen"))
    mr = (ct.astype(np.int32) + 1000).astype(np.int16)  # no air values, no DICOM modality: not CT
    np.testing.assert_array_equal(retriever.embed_volume(mr, affine), retriever.embed_volume(mr, affine,
                                                                                           window="percentile"))
    assert retriever.embed_volume(mr, affine, modality="CT") is retriever.embed_volume(mr, affine, window="abdomen")
    result = retriever.rank_volumes("liver", [(ct, affine), (other, affine)], display_windows=[lung, None],
                                    modalities=["CT", None])
    expected = retriever.rank_volumes("liver", [retriever.embed_volume(ct, affine, window=lung),
                                                retriever.embed_volume(other, affine, window="abdomen")])
    assert [r[:2] for r in result.ranking] == [r[:2] for r in expected.ranking]
    assert result.provenance.intensity is None  # the two volumes had different windows
    texts = retriever.rank_texts((ct, affine), TEXTS[:2], display_window=lung)
    assert json.loads(texts.provenance.intensity)["name"] == "display (Slicer)"
    with pytest.raises(InputError, match="one per volume"):
        retriever.rank_volumes("liver", [(ct, affine), (other, affine)], display_windows=[lung])


def test_progress_events(tiny_clip, volumes):
    events = []
    retriever = Retriever(tiny_clip, device="cpu", dtype="float32", progress=events.append)
    assert [e.stage for e in events][:1] == ["load"] and events[-1].fraction == 1.0
    events.clear()
    retriever.rank_volumes("kidney", volumes[:2])
    fractions = [e.fraction for e in events if e.stage == "encode" and e.fraction is not None]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0


# -------------------------------------------------------------------------------------------------------------- cache


@pytest.fixture
def counting(tiny_clip, monkeypatch):
    """A fresh Retriever whose encode_image calls are counted."""
    retriever = Retriever(tiny_clip, device="cpu", dtype="float32")
    calls = []
    original = retriever.model.encode_image

    def encode_image(images):
        calls.append(tuple(images.shape))
        return original(images)

    monkeypatch.setattr(retriever.model, "encode_image", encode_image)
    return retriever, calls


def test_cache_encodes_each_volume_once(counting, volumes):
    retriever, calls = counting
    array, affine = volumes[0]
    first = retriever.embed_volume(array, affine)
    assert calls == [(1, 1, *retriever.model.config.img_size)]
    # Same content in another object and memory layout, and every ranking method: no new encoding.
    np.testing.assert_array_equal(retriever.embed_volume(np.asfortranarray(array.copy()), affine.copy()), first)
    retriever.rank_texts((array, affine), TEXTS)
    retriever.rank_volumes("liver", [(array, affine)])
    retriever.similarity([(array, affine)], TEXTS[:2])
    assert len(calls) == 1
    # The default window of a CT without a display window is the abdomen preset: the same key, nothing encoded.
    retriever.embed_volume(array, affine, window="abdomen")
    assert len(calls) == 1
    # What changes the model input is a new key: window, geometry, voxels.
    retriever.embed_volume(array, affine, window="lung")
    retriever.embed_volume(array, affine, window=(40, 350))  # the same window as "abdomen", given as numbers
    moved = affine.copy()
    moved[:3, 3] += 10.0  # translation only: the input tensor is the same, but it is another volume's geometry
    retriever.embed_volume(array, moved)
    edited = array.copy()
    edited[5, 20, 20] += 1
    retriever.embed_volume(edited, affine)
    assert len(calls) == 5
    # Three volumes ranked twice: three encodings.
    calls.clear()
    retriever.rank_volumes("liver", volumes)
    retriever.rank_volumes("kidney", volumes)
    assert len(calls) == 2  # volumes[0] was cached already
    with pytest.raises(ValueError):
        first[0] = 1.0  # the cached embedding is read-only
    retriever.clear_cache()
    retriever.embed_volume(array, affine)
    assert len(calls) == 3


def test_cache_size_bounds_the_cache(tiny_clip, volumes):
    retriever = Retriever(tiny_clip, device="cpu", dtype="float32", cache_size=2)
    for array, affine in volumes:
        retriever.embed_volume(array, affine)
    assert len(retriever._cache) == 2
    assert volume_key(*volumes[0], "abdomen", retriever.convention, retriever.config.img_size) not in retriever._cache
    assert volume_key(*volumes[2], "abdomen", retriever.convention, retriever.config.img_size) in retriever._cache


def test_volume_key():
    array = make_volume(0)
    key = volume_key(array, AFFINE)
    assert key == volume_key(array[::-1][::-1], AFFINE) == volume_key(np.asfortranarray(array), AFFINE)
    assert key != volume_key(array.astype(np.int32), AFFINE)  # dtype is part of the content
    assert key != volume_key(array.reshape(12, 48, 40), AFFINE)
    assert key != volume_key(array, AFFINE, window="abdomen")
    assert volume_key(array, AFFINE, window="abdomen") == volume_key(array, AFFINE, window=" Abdomen ")


# ------------------------------------------------------------------------------------------------------------- recall

HAND_MADE = np.array([
    [0.90, 0.10, 0.30, 0.20],
    [0.80, 0.70, 0.10, 0.00],
    [0.20, 0.60, 0.50, 0.40],
    [0.10, 0.20, 0.30, 0.05],
])


def test_recall_at_k_hand_computed():
    # Rank of the matching text per image row: 0, 1 (0.8 > 0.7), 1 (0.6 > 0.5), 3 (0.1, 0.2, 0.3 > 0.05).
    # Rank of the matching image per text column: 0, 0, 0, 2 (0.2, 0.4 > 0.05).
    assert recall_at_k(HAND_MADE, ks=(1, 2, 3, 10)) == {
        "image_to_text@1": 0.25, "image_to_text@2": 0.75, "image_to_text@3": 0.75, "image_to_text@10": 1.0,
        "text_to_image@1": 0.75, "text_to_image@2": 0.75, "text_to_image@3": 1.0, "text_to_image@10": 1.0,
    }
    assert list(recall_at_k(HAND_MADE)) == ["image_to_text@1", "image_to_text@5", "image_to_text@10",
                                            "text_to_image@1", "text_to_image@5", "text_to_image@10"]


def test_recall_at_k_ties_count_against_the_model():
    collapsed = np.full((3, 3), 0.5)
    assert recall_at_k(collapsed, ks=(1, 2, 3)) == {
        "image_to_text@1": 0.0, "image_to_text@2": 0.0, "image_to_text@3": 1.0,
        "text_to_image@1": 0.0, "text_to_image@2": 0.0, "text_to_image@3": 1.0,
    }


def official_calculate_recall(similarity_matrix: torch.Tensor, k: int) -> float:
    """``Bench/eval/eval_itr.py``'s metric, reproduced: matching index among the row's top-k."""
    _, topk = similarity_matrix.topk(k, dim=1)
    return float(torch.eq(topk, torch.arange(similarity_matrix.size(0)).view(-1, 1)).float().sum(dim=1).mean())


def test_recall_at_k_equals_official_eval_without_ties():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(40, 40)) + 2.0 * np.eye(40) * rng.uniform(0, 1, 40)
    ours = recall_at_k(sim)
    scores = torch.from_numpy(sim)
    for k in (1, 5, 10):
        assert ours[f"image_to_text@{k}"] == pytest.approx(official_calculate_recall(scores, k))  # official IR_Rk
        assert ours[f"text_to_image@{k}"] == pytest.approx(official_calculate_recall(scores.T, k))  # official TR_Rk
    assert 0 < ours["image_to_text@1"] < ours["image_to_text@10"] < 1


@pytest.mark.parametrize(
    ("similarity", "ks", "message"),
    [
        (np.zeros((3, 4)), (1,), "square"),
        (np.zeros((0, 0)), (1,), "square"),
        (np.zeros(3), (1,), "square"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), (1,), "NaN"),
        (np.eye(3), (0,), "positive integers"),
        (np.eye(3), (), "positive integers"),
        (np.eye(3), (1.5,), "positive integers"),
    ],
)
def test_recall_at_k_errors(similarity, ks, message):
    with pytest.raises(InputError, match=message):
        recall_at_k(similarity, ks=ks)


# ------------------------------------------------------------------------------------------------------------- errors


def test_errors(retriever, volumes):
    volume = volumes[0]
    with pytest.raises(InputError, match="no texts given"):
        retriever.rank_texts(volume, [])
    with pytest.raises(InputError, match=r"texts\[1\] is empty or only whitespace"):
        retriever.rank_texts(volume, ["liver", " \n\t"])
    with pytest.raises(InputError, match=r"texts\[0\] is a int"):
        retriever.embed_texts([3])
    with pytest.raises(InputError, match="query text is empty"):
        retriever.rank_volumes("   ", volumes)
    with pytest.raises(InputError, match="one query text"):
        retriever.rank_volumes(["liver", "kidney"], volumes)
    with pytest.raises(InputError, match="no volumes given"):
        retriever.rank_volumes("liver", [])
    with pytest.raises(InputError, match="no volumes given"):
        retriever.similarity([], TEXTS)
    with pytest.raises(InputError, match="2 labels were given for 3 candidates"):
        retriever.rank_volumes("liver", volumes, labels=["a", "b"])
    with pytest.raises(InputError, match="1 labels were given for 2 candidates"):
        retriever.rank_texts(volume, TEXTS[:2], labels=["a"])
    with pytest.raises(InputError, match=r"volumes\[1\] has shape \(12, 40, 48\)"):
        retriever.rank_volumes("liver", [volume, volume[0]])  # an array without its matrix
    with pytest.raises(InputError, match="zero or not finite"):
        retriever.rank_volumes("liver", [np.zeros(retriever.model.config.hidden_size)])
    with pytest.raises(InputError, match="got 3 items"):
        retriever.rank_texts((volume[0], volume[1], None), TEXTS)
    with pytest.raises(GeometryError, match="singular"):
        retriever.embed_volume(volume[0], np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="not a real scalar"):
        retriever.embed_volume(volume[0].astype(complex), AFFINE)
    with pytest.raises(InputError, match="single 2D image"):
        retriever.embed_volume(volume[0][0], AFFINE)
    with pytest.raises(InputError, match="unknown intensity window"):
        retriever.embed_volume(*volume, window="bone-ish")
