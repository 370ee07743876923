"""Image <-> text retrieval with M3D-CLIP: rank reports for a volume, or volumes for a report.

M3D-CLIP (BAAI-DCAI/M3D ``LaMed/src/model/CLIP.py``) embeds a volume (3D ViT CLS token -> projection -> L2 norm) and a
text (BERT [CLS] -> projection -> L2 norm) in one space; their dot product is the cosine similarity. :class:`Retriever`
loads the model once, sends volumes through :func:`.geometry.to_model_input` (the same preprocessing as every other
task) and keeps the embedding of every volume it has seen, keyed by a hash of the voxels, the IJK->RAS matrix and the
intensity window, so a volume is encoded once however many queries use it.

:func:`recall_at_k` is the official ``Bench/eval/eval_itr.py`` metric (matching pairs on the diagonal of an
``[images, texts]`` similarity matrix); it needs numpy only, so evaluation code can use it without torch.

Usage::

    retriever = Retriever("GoodBaiBai88/M3D-CLIP", device="cuda")
    result = retriever.rank_texts((array_kji, ijk_to_ras), ["Liver metastases.", "Normal chest CT."])
    result.ranking[0]  # (index, label, cosine) of the best-matching text
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from .errors import InputError
from .geometry import to_model_input, validate_ijk_to_ras
from .model.hub import snapshot_revision
from .preprocessing import DisplayWindow, WindowArg, default_window, resolve_window
from .progress import ProgressCallback, report_progress
from .results import Provenance, RetrievalResult
from .tasks import FIND_SIMILAR

if TYPE_CHECKING:  # torch is imported lazily: it is heavy
    import torch

__all__ = ["Retriever", "VolumeInput", "recall_at_k", "volume_key"]

logger = logging.getLogger(__name__)

VolumeInput = Union[tuple[np.ndarray, np.ndarray], np.ndarray]
"""A volume as ``(array_kji, ijk_to_ras)``, or its precomputed embedding (1-D, the model's hidden size)."""


# ----------------------------------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------------------------------


def recall_at_k(similarity: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in both directions for a similarity matrix whose matching pairs are on the diagonal.

    ``similarity[i, j]`` is the score of image i against text j (``[N_img, N_txt]``, square: text i belongs to
    image i), as in the official ``Bench/eval/eval_itr.py``. Returns fractions in [0, 1]::

        {"image_to_text@1": ..., "image_to_text@5": ..., ..., "text_to_image@10": ...}

    ``image_to_text@k``: share of images whose own text is among the k best-scoring texts of that image's row (the
    official script prints it as ``IR_Rk``, ranking ``scores_mat`` row-wise); ``text_to_image@k``: share of texts
    whose own image is among the k best images of that text's column (official ``TR_Rk``).

    Ties are counted against the model: an item tied with the correct one is ranked before it (the official
    ``torch.topk`` breaks ties arbitrarily). So a collapsed model that gives every pair the same score scores 0
    rather than 1. ``k`` larger than the number of candidates counts every pair as found.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise InputError(
            f"recall_at_k needs a square, non-empty [images, texts] similarity matrix with matching pairs on the "
            f"diagonal; got shape {sim.shape}"
        )
    if not np.isfinite(sim).all():
        raise InputError("the similarity matrix contains NaN or infinite values; check the embeddings")
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise InputError(f"ks must be positive integers, e.g. (1, 5, 10); got {ks!r}")
    diagonal = np.diag(sim)
    # Rank of the correct item (0 = best): how many other candidates score at least as high (pessimistic ties).
    rank_i2t = (sim >= diagonal[:, None]).sum(axis=1) - 1  # per image row, over texts
    rank_t2i = (sim >= diagonal[None, :]).sum(axis=0) - 1  # per text column, over images
    out: dict[str, float] = {}
    for name, ranks in (("image_to_text", rank_i2t), ("text_to_image", rank_t2i)):
        for k in ks:
            out[f"{name}@{int(k)}"] = float(np.mean(ranks < k))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Volume identity
# ----------------------------------------------------------------------------------------------------------------------


def volume_key(array_kji: np.ndarray, ijk_to_ras: Any, window: WindowArg = None, convention: Optional[str] = None,
               model_shape: Sequence[int] = ()) -> str:
    """Content hash of a volume and how it is preprocessed: equal keys give equal model inputs.

    Covers the voxel values (with dtype and shape), the IJK->RAS matrix, the resolved intensity window, the
    orientation convention and the model shape. The array is hashed slice by slice, so a non-contiguous view is not
    copied whole.
    """
    array = np.asarray(array_kji)
    if array.dtype.kind not in "biuf":
        raise InputError(
            f"the volume's voxel type {array.dtype} is not a real scalar; convert it to a numeric scalar volume"
        )
    matrix = validate_ijk_to_ras(ijk_to_ras)
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps({
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "ijk_to_ras": matrix.astype("<f8").tolist(),
        "window": repr(resolve_window(window)),
        "convention": convention,
        "model_shape": [int(s) for s in model_shape],
    }, sort_keys=True).encode())
    if array.ndim == 0 or array.shape[0] == 0:
        digest.update(np.ascontiguousarray(array).tobytes())
    else:
        for slab in array:
            digest.update(memoryview(np.ascontiguousarray(slab)).cast("B"))
    return digest.hexdigest()


def _clean_texts(texts: Any, what: str) -> list[str]:
    """A non-empty list of non-blank strings, or an InputError that says which one is wrong."""
    if isinstance(texts, str):
        texts = [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise InputError(f"{what} must be a list of strings, got {type(texts).__name__}") from None
    if not texts:
        raise InputError(f"no {what} given; pass at least one non-empty text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"{what}[{i}] is a {type(text).__name__}, not a string")
        if not text.strip():
            raise InputError(f"{what}[{i}] is empty or only whitespace; give a report sentence or remove it")
    return texts


def _clean_labels(labels: Optional[Sequence[Any]], n: int, default: Sequence[str]) -> list[str]:
    if labels is None:
        return list(default)
    labels = [str(label) for label in labels]
    if len(labels) != n:
        raise InputError(f"{len(labels)} labels were given for {n} candidates; give one label per candidate or none")
    return labels


# ----------------------------------------------------------------------------------------------------------------------
# Retriever
# ----------------------------------------------------------------------------------------------------------------------


class Retriever:
    """M3D-CLIP loaded once; embeds volumes (cached) and texts, and ranks one against the other.

    Args:
        source: hub id (default ``GoodBaiBai88/M3D-CLIP``) or a local checkpoint folder.
        device: "cpu", "cuda", "cuda:1", "mps" or None (best available).
        dtype: torch dtype or its name; None = bf16 on CUDA, fp32 else.
        revision: hub revision (branch, tag or commit) to pin.
        progress: callback for load/download/encode :class:`~.progress.ProgressEvent` s.
        cache_size: how many volume embeddings to keep (least recently used are dropped; each is a few KB).
        convention: orientation convention of the model input; default: M3D-Cap's, whose image-report pairs
            M3D-CLIP was trained on.

    ``window`` (of the methods that take volumes) is :func:`.geometry.to_model_input`'s: a preset name such as
    "abdomen", "percentile", "minmax", or ``(center, width)`` in HU, for every volume. None (default): each volume in
    the window of retrieval's training data (:attr:`.tasks.FIND_SIMILAR` ``.window``, the *display* window --
    M3D-CLIP learned from M3D-Cap's image-report pairs, JPEGs in the window their uploaders viewed): the volume's
    ``display_window`` when given (Slicer's window/level, the DICOM WindowCenter/Width), else the abdomen preset for
    CT, else the M3D-Seg percentiles (:func:`.preprocessing.default_window`).
    """

    def __init__(
        self,
        source: Union[str, Path, None] = None,
        device: Union[str, "torch.device", None] = None,
        dtype: Union[str, "torch.dtype", None] = None,
        *,
        revision: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        cache_size: int = 1024,
        convention: Optional[str] = None,
    ) -> None:
        from .model.hub import DEFAULT_CLIP
        from .model.loading import load_clip

        if cache_size < 0:
            raise InputError(f"cache_size must be >= 0, got {cache_size}")
        self.source = str(source or DEFAULT_CLIP)
        report_progress(progress, "load", 0.0, f"loading M3D-CLIP from {self.source}")
        self.model, self.tokenizer = load_clip(self.source, device=device, dtype=dtype, revision=revision,
                                               progress=progress)
        report_progress(progress, "load", 1.0, "M3D-CLIP ready")
        self.config = self.model.config
        weight = self.model.mm_vision_proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.revision = snapshot_revision(getattr(self.model, "checkpoint_path", None)) or revision
        self.convention = convention or FIND_SIMILAR.convention
        self.progress = progress
        self.cache_size = int(cache_size)
        # key -> (embedding [hidden] float32, mapping convention, intensity JSON)
        self._cache: collections.OrderedDict[str, tuple[np.ndarray, str, str]] = collections.OrderedDict()
        self._lock = threading.Lock()

    # -- embeddings ---------------------------------------------------------------------------------------------------
    @property
    def embedding_size(self) -> int:
        return int(self.config.hidden_size)

    def embed_volume(self, array_kji: np.ndarray, ijk_to_ras: Any, window: WindowArg = None, *,
                     display_window: Optional[DisplayWindow] = None, modality: Optional[str] = None) -> np.ndarray:
        """Embedding ``[hidden]`` (float32, unit length) of a volume; encoded once per content + geometry + window.
        ``window`` None: the volume's default (see the class docstring) from ``display_window`` and ``modality``.

        The returned array is the cached one: copy it before modifying it.
        """
        return self._embed_volume(array_kji, ijk_to_ras, window, display_window, modality)[1][0]

    def _embed_volume(self, array_kji: np.ndarray, ijk_to_ras: Any, window: WindowArg,
                      display_window: Optional[DisplayWindow] = None,
                      modality: Optional[str] = None) -> tuple[str, tuple[np.ndarray, str, str]]:
        """-> (cache key, (embedding, convention, intensity JSON))."""
        import torch

        array = np.asarray(array_kji)
        if window is None and array.dtype.kind in "biuf":  # other types: volume_key says what is wrong
            value_range = (float(array.min()), float(array.max())) if array.size else None
            window = default_window(FIND_SIMILAR.window, display_window=display_window, modality=modality,
                                    value_range=value_range)
        key = volume_key(array_kji, ijk_to_ras, window, self.convention, self.config.img_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return key, self._cache[key]
        image, mapping = to_model_input(array_kji, ijk_to_ras, window=window, model_shape=self.config.img_size,
                                        convention=self.convention)
        report_progress(self.progress, "encode", None, "encoding the volume with M3D-CLIP")
        with torch.inference_mode():
            tensor = torch.from_numpy(image)[None].to(device=self.device, dtype=self.dtype)  # [1, 1, D, H, W]
            embedding = self.model.encode_image(tensor)[0].float().cpu().numpy()
        embedding.setflags(write=False)  # shared by every caller that hits the cache
        entry = (embedding, mapping.convention, json.dumps(mapping.intensity, sort_keys=True))
        with self._lock:
            if self.cache_size:
                self._cache[key] = entry
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return key, entry

    def clear_cache(self) -> None:
        """Forget every volume embedding."""
        with self._lock:
            self._cache.clear()

    def embed_texts(self, texts: Union[str, Sequence[str]], batch_size: int = 16) -> np.ndarray:
        """Embeddings ``[N, hidden]`` (float32, unit length) of texts, tokenized as the model was trained.

        BERT tokenizer, truncated and padded to ``config.max_text_len`` tokens (official: ``padding="max_length"``).
        """
        import torch

        texts = _clean_texts(texts, "texts")
        batch_size = max(int(batch_size), 1)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(texts[start:start + batch_size], max_length=self.config.max_text_len,
                                       truncation=True, padding="max_length", return_tensors="pt")
                embedding = self.model.encode_text(batch["input_ids"].to(self.device),
                                                   batch["attention_mask"].to(self.device))
                out.append(embedding.float().cpu().numpy())
        return np.concatenate(out, axis=0)

    def _volume_embedding(self, volume: VolumeInput, what: str, window: WindowArg,
                          display_window: Optional[DisplayWindow] = None, modality: Optional[str] = None
                          ) -> tuple[np.ndarray, Optional[str], Optional[str], Optional[str]]:
        """-> (embedding, convention, intensity JSON, cache key); the last three are None for a given embedding.

        ``(array, ijk_to_ras)`` is embedded (or found in the cache); a precomputed embedding is checked and
        L2-normalised.
        """
        if isinstance(volume, (tuple, list)):
            if len(volume) != 2:
                raise InputError(f"{what} must be (array_kji, ijk_to_ras) or an embedding; got {len(volume)} items")
            key, (embedding, convention, intensity) = self._embed_volume(volume[0], volume[1], window,
                                                                         display_window, modality)
            return embedding, convention, intensity, key
        try:
            embedding = np.asarray(volume, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(
                f"{what} must be (array_kji, ijk_to_ras) or an embedding, got {type(volume).__name__}"
            ) from None
        if embedding.shape != (self.embedding_size,):
            raise InputError(
                f"{what} has shape {embedding.shape}; an embedding of this model has shape ({self.embedding_size},) "
                "(from Retriever.embed_volume); to pass a volume give (array_kji, ijk_to_ras)"
            )
        norm = float(np.linalg.norm(embedding))
        if not np.isfinite(norm) or norm == 0.0:
            raise InputError(f"{what} is zero or not finite; it is not an embedding from Retriever.embed_volume")
        return embedding / norm, None, None, None

    # -- ranking ------------------------------------------------------------------------------------------------------
    def similarity(self, volumes: Sequence[VolumeInput], texts: Sequence[str], window: WindowArg = None) -> np.ndarray:
        """Cosine similarity ``[N_volumes, N_texts]`` (the matrix :func:`recall_at_k` takes)."""
        if len(volumes) == 0:
            raise InputError("no volumes given; pass at least one (array_kji, ijk_to_ras) or embedding")
        images = np.stack([self._volume_embedding(v, f"volumes[{i}]", window)[0] for i, v in enumerate(volumes)])
        return images @ self.embed_texts(texts).T

    def rank_texts(
        self,
        volume: VolumeInput,
        texts: Sequence[str],
        labels: Optional[Sequence[str]] = None,
        *,
        window: WindowArg = None,
        query: Optional[str] = None,
        display_window: Optional[DisplayWindow] = None,
        modality: Optional[str] = None,
    ) -> RetrievalResult:
        """Texts ranked by cosine similarity to a volume, best first.

        ``volume``: ``(array_kji, ijk_to_ras)`` or an embedding from :meth:`embed_volume`. ``labels`` name the texts
        in the result (default: the texts). ``query`` describes the volume in the result (default: shape and hash).
        ``display_window`` and ``modality``: what the default window (``window=None``) is made from.
        """
        started = time.perf_counter()
        texts = _clean_texts(texts, "texts")
        labels = _clean_labels(labels, len(texts), texts)
        image, convention, intensity, key = self._volume_embedding(volume, "volume", window, display_window, modality)
        scores = self.embed_texts(texts) @ image
        if query is None:
            if key is None:
                query = "volume embedding"
            else:
                query = f"volume {'x'.join(str(s) for s in np.shape(volume[0]))} (KJI) #{key[:12]}"
        return RetrievalResult(query=query, ranking=_ranking(scores, labels),
                               provenance=self._provenance(json.dumps(texts), convention, intensity, started))

    def rank_volumes(
        self,
        text: str,
        volumes: Sequence[VolumeInput],
        labels: Optional[Sequence[str]] = None,
        *,
        window: WindowArg = None,
        display_windows: Optional[Sequence[Optional[DisplayWindow]]] = None,
        modalities: Optional[Sequence[Optional[str]]] = None,
    ) -> RetrievalResult:
        """Volumes ranked by cosine similarity to a text, best first.

        ``volumes``: each ``(array_kji, ijk_to_ras)`` (embedded once, then cached) or a precomputed embedding.
        ``labels`` name the volumes in the result (default ``"volume 0"``, ``"volume 1"``, ...).
        ``display_windows`` and ``modalities``: one per volume (None where unknown), what each volume's default
        window (``window=None``) is made from.
        """
        started = time.perf_counter()
        if not isinstance(text, str):
            raise InputError(f"rank_volumes takes one query text (a string), got {type(text).__name__}; call it once "
                             "per text")
        if not text.strip():
            raise InputError("the query text is empty or only whitespace; type what to look for, e.g. 'liver lesion'")
        volumes = list(volumes) if volumes is not None else []
        if not volumes:
            raise InputError("no volumes given to rank; pass at least one (array_kji, ijk_to_ras) or embedding")
        labels = _clean_labels(labels, len(volumes), [f"volume {i}" for i in range(len(volumes))])
        display_windows = _per_volume(display_windows, len(volumes), "display_windows")
        modalities = _per_volume(modalities, len(volumes), "modalities")
        query = self.embed_texts([text])[0]
        images, conventions, intensities = [], set(), set()
        for i, volume in enumerate(volumes):
            report_progress(self.progress, "encode", i / len(volumes), f"embedding {labels[i]}")
            embedding, convention, intensity, _ = self._volume_embedding(volume, f"volumes[{i}]", window,
                                                                         display_windows[i], modalities[i])
            images.append(embedding)
            conventions.add(convention)
            intensities.add(intensity)
        report_progress(self.progress, "encode", 1.0, "volumes embedded")
        scores = np.stack(images) @ query
        convention = conventions.pop() if len(conventions) == 1 else None
        intensity = intensities.pop() if len(intensities) == 1 else None  # per-volume percentiles usually differ
        return RetrievalResult(query=text, ranking=_ranking(scores, labels),
                               provenance=self._provenance(text, convention, intensity, started))

    def _provenance(self, prompt: str, convention: Optional[str], intensity: Optional[str],
                    started: float) -> Provenance:
        return Provenance(
            task=FIND_SIMILAR.training_name,
            model=self.source,
            model_revision=self.revision,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            prompt=prompt,
            convention=convention,
            intensity=intensity,
            duration_s=round(time.perf_counter() - started, 4),
        )


def _per_volume(values: Optional[Sequence[Any]], n: int, what: str) -> list[Any]:
    """One value per volume (None for all when not given)."""
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise InputError(f"{len(values)} {what} were given for {n} volumes; give one per volume (None where unknown)")
    return values


def _ranking(scores: np.ndarray, labels: list[str]) -> list[tuple[int, str, float]]:
    """Best first; equal scores keep the candidates' order."""
    order = np.argsort(-scores, kind="stable")
    return [(int(i), labels[i], float(scores[i])) for i in order]
