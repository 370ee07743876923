"""InferenceEngine: load M3D-LaMed once, encode a volume once, answer many prompts about it.

Each task sees the volume as its training data showed it: the task's orientation convention
(:attr:`~M3DAssistantLib.tasks.Task.convention`) and, unless the caller chose a window, its intensity scheme
(:func:`~M3DAssistantLib.preprocessing.default_window`: the display window for report/VQA, percentiles for
boxes and masks). What is reused per volume (keyed by the volume's content hash, the preprocessing parameters, and
the task's orientation convention and intensity scheme, within one engine = one model):

* the model input tensor and its :class:`~M3DAssistantLib.geometry.VolumeToModelMapping`,
* the vision tower + projector output (the image tokens),
* the key/value cache of the shared prefix (positions 0..N: the first token and the image features): every question
  starts from a *copy* of it, because transformers' generation appends to the cache in place,
* SegVol's image embedding (computed on the first segmentation).

The official scripts recompute all of this for every question; ``caching=False`` does the same (for checks and the
benchmark baseline). Answers are identical either way (tested for every task).

Beyond the answer (``analysis=`` :class:`~M3DAssistantLib.results.AnalysisOptions` on every task method): confidence
from the decoding steps' own scores (:mod:`.confidence`), an evidence map (:mod:`.evidence`), zoom-in refinement of
masks (:mod:`.refinement`), the model's REC box next to a mask; and with every mask its box and measurements
(:mod:`.measurements`). The engine only calls them at the right moment, with the model and the volume at hand.

Why this file is long: the eight task methods share one loaded model, its per-volume caches, its lock and its
cancel; what they compute beyond the answer lives in the modules above and is only called from here.

Thread safety: one request runs at a time (a lock); :meth:`cancel` may be called from any thread and stops the
running request at its next decoding step or encoder call with :class:`~M3DAssistantLib.errors.CancelledError`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from . import confidence as confidence_
from . import prompts
from .errors import CancelledError, InputError
from .geometry import (
    RasRoi,
    VolumeToModelMapping,
    box_to_roi,
    logits_to_mask,
    roi_to_box,
    to_model_input,
    validate_volume,
)
from .model.hub import snapshot_revision
from .model.tokenizer import control_token_names, decode
from .oom import translate_out_of_memory
from .preprocessing import DisplayWindow, IntensitySpec, default_window, is_ct, resolve_window
from .progress import ProgressCallback, report_progress
from .results import (
    AnalysisOptions,
    BoxResult,
    ChoiceResult,
    Provenance,
    RetrievalResult,
    SamplingOptions,
    SegmentationResult,
    TextResult,
)
from .retrieval import volume_key  # one content hash for every cache (re-exported for the server)
from .tasks import (
    ASK,
    CHOOSE,
    DESCRIBE_REGION,
    FIND_SIMILAR,
    LOCATE,
    REPORT,
    SEGMENT,
    SEGMENT_EXPRESSION,
    STREAMING_TASKS,
    Task,
)
from .tasks import get as get_task

logger = logging.getLogger(__name__)

TextCallback = Callable[[str], None]


@dataclasses.dataclass
class VolumeHandle:
    """What :meth:`InferenceEngine.set_volume` registered: identifies the volume and its preprocessing."""

    key: str
    shape: tuple[int, int, int]
    window: Any  # the caller's choice for every task; None: each task's default (default_window)
    roi: Optional[RasRoi]
    slice_range: Optional[tuple[int, int]]
    display_window: Optional[DisplayWindow] = None  # what the reader sees (Slicer W/L, DICOM WindowCenter/Width)
    modality: Optional[str] = None  # DICOM Modality when known ("CT", "MR", ...)


@dataclasses.dataclass
class _Volume:
    handle: VolumeHandle
    array: np.ndarray
    ijk_to_ras: np.ndarray
    views: dict[tuple[str, IntensitySpec], "_View"] = dataclasses.field(default_factory=dict)  # by (convention, window)
    value_range: Optional[tuple[float, float]] = None  # min and max voxel, computed when a default window needs them

    def window_for(self, task: Task) -> IntensitySpec:
        """The caller's window, else the task's default for this volume."""
        h = self.handle
        if h.window is not None:
            return resolve_window(h.window)
        if self.value_range is None:
            self.value_range = (float(self.array.min()), float(self.array.max()))
        return default_window(task.window, display_window=h.display_window, modality=h.modality,
                              value_range=self.value_range)


@dataclasses.dataclass
class _View:
    """One preprocessing of one volume (one orientation convention) and what the model computed from it."""

    images: torch.Tensor  # [1, 1, D, H, W], model dtype/device
    mapping: VolumeToModelMapping
    image_features: Optional[torch.Tensor] = None  # [1, N, hidden]
    prefix_cache: Any = None  # transformers Cache over positions 0..N (first token + N image features)
    seg_embedding: Optional[torch.Tensor] = None


class _CancelCriteria:
    """A transformers StoppingCriteria that stops every sequence once the engine's cancel event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TextStreamer:
    """A transformers streamer that decodes incrementally and reports progress per token."""

    def __init__(self, tokenizer: Any, on_text: Optional[TextCallback], progress: Optional[ProgressCallback],
                 max_new_tokens: int):
        self.tokenizer, self.on_text, self.progress = tokenizer, on_text, progress
        self.max_new_tokens = max(1, max_new_tokens)
        self.ids: list[int] = []
        self.sent = ""
        self._control_names: Optional[list[str]] = None

    def _held_back(self, text: str) -> int:
        """How many trailing characters may still become a control token spelled out by ordinary tokens (``<|en``):
        :func:`~.model.tokenizer.decode` drops a completed one, so they are sent only once they cannot."""
        if self._control_names is None:
            self._control_names = control_token_names(self.tokenizer)
        tail = text[-max((len(n) for n in self._control_names), default=0):]
        return max((k for k in range(1, len(tail) + 1)
                    if any(n.startswith(tail[-k:]) and len(n) > k for n in self._control_names)), default=0)

    def put(self, value: torch.Tensor) -> None:
        new = value.reshape(-1).tolist()
        if not new:  # the (empty) prompt ids: generation from inputs_embeds has none
            return
        self.ids += new
        report_progress(self.progress, "generate", len(self.ids) / self.max_new_tokens, f"{len(self.ids)} tokens")
        if self.on_text is None:
            return
        text = decode(self.tokenizer, self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        text = text[: len(text) - self._held_back(text)]
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        """Send what was held back: an answer may end in an incomplete character, which the result's text keeps."""
        if self.on_text is None or not self.ids:
            return
        text = decode(self.tokenizer, self.ids)
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text


def _checkpoint_revision(folder: Optional[Path]) -> Optional[str]:
    """The hub commit of a cached snapshot, else a hash of the local config and weight index."""
    if folder is None:
        return None
    folder = Path(folder)
    commit = snapshot_revision(folder)
    if commit:
        return commit
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    return "local-" + digest.hexdigest()[:12]


class InferenceEngine:
    """All eight M3D tasks on one loaded model. See the module docstring for what is cached.

    Args:
        model: hub id or local folder of an M3D-LaMed checkpoint (default ``$M3D_MODEL`` / Phi-3-4B), or an already
            loaded ``(model, tokenizer)`` pair.
        device, dtype, revision: as :func:`M3DAssistantLib.model.load_model`.
        clip_model: hub id or folder of M3D-CLIP for :meth:`retrieve` (loaded on first use).
        caching: reuse image features, prefix KV cache and SegVol embedding across prompts (default True).
        cache_prefix: with ``caching``, also reuse the KV cache of the first token + image features (default True;
            off only to measure what it brings).
        max_volumes: how many volumes keep their cached features (least recently used are dropped).
        convention: force one orientation convention for every task (default: the task's own, see
            :attr:`.tasks.Task.convention`).
        progress: receives :class:`~M3DAssistantLib.progress.ProgressEvent` for loading and every request.
    """

    def __init__(
        self,
        model: Union[str, Path, tuple, None] = None,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        revision: Optional[str] = None,
        clip_model: Union[str, Path, None] = None,
        caching: bool = True,
        cache_prefix: bool = True,
        max_volumes: int = 4,
        convention: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
    ):
        from .model import load_model

        self.progress = progress
        if isinstance(model, tuple):
            self.model, self.tokenizer = model
        else:
            self.model, self.tokenizer = load_model(model, device=device, dtype=dtype, revision=revision,
                                                    progress=progress)
        self.caching = caching
        self.cache_prefix = cache_prefix
        self.max_volumes = max(1, int(max_volumes))
        self.convention = convention
        self.clip_source = clip_model
        self._retriever = None
        self._volumes: "collections.OrderedDict[str, _Volume]" = collections.OrderedDict()
        self._current: Optional[str] = None
        self._lock = threading.RLock()
        self._cancel = threading.Event()
        self.model_source = str(getattr(self.model, "source", "") or getattr(self.model, "checkpoint_path", ""))
        self.model_revision = _checkpoint_revision(getattr(self.model, "checkpoint_path", None))
        self.counters = collections.Counter()  # encoder calls etc., for tests and benchmarks
        self._batch: Any = None  # the batch being planned/replayed by run_batch (batched.py)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def model_shape(self) -> tuple[int, int, int]:
        return tuple(self.model.multimodal.image_size)  # type: ignore[return-value]

    def info(self) -> dict[str, Any]:
        """What is loaded (for the server's model-info endpoint and the CLI)."""
        mm = self.model.multimodal
        return {"model": self.model_source, "revision": self.model_revision,
                "model_type": self.model.lamed_config.model_type,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "image_size": list(mm.image_size), "image_tokens": mm.num_image_tokens,
                "segmentation": self.model.seg_enabled}

    # ------------------------------------------------------------------------------------------------- volumes
    def set_volume(
        self,
        array_kji: np.ndarray,
        ijk_to_ras: np.ndarray,
        *,
        window: Any = None,
        roi: Optional[RasRoi] = None,
        slice_range: Optional[tuple[int, int]] = None,
        content_key: Optional[str] = None,
        display_window: Union[DisplayWindow, tuple[float, float], None] = None,
        modality: Optional[str] = None,
    ) -> VolumeHandle:
        """Make this volume the current one. Its model input and features are computed on first use and kept;
        setting the same content with the same window/ROI again reuses them (nothing is recomputed).

        ``window``: one intensity scheme for every task (a preset, ``(center, width)``, ...), overriding the
        per-task defaults; None (default) gives each task the scheme of its training data
        (:func:`~M3DAssistantLib.preprocessing.default_window`). ``display_window``: the window the user sees the
        volume in -- Slicer's window/level, or the DICOM WindowCenter/WindowWidth from
        :func:`~M3DAssistantLib.volume_io.read_volume_metadata` -- which report and VQA then use; ``modality``: the
        DICOM Modality when known (without it, CT is recognised by its values).
        ``content_key``: a caller that already hashed the volume (the server, per uploaded volume) passes
        :func:`volume_key` of it to skip hashing again.

        The display window and modality are not part of the volume's identity: setting the same volume with another
        display window (the user changed the window/level between two questions) keeps its cached views -- a mask
        task's view does not depend on it -- and only the tasks whose default window is the display window get a
        new view (as :meth:`set_display` does)."""
        array = validate_volume(array_kji)
        matrix = np.asarray(ijk_to_ras, dtype=np.float64)
        roi_key = None if roi is None else (tuple(np.round(roi.center, 6)), tuple(np.round(roi.size, 6)),
                                            tuple(np.round(np.asarray(roi.axes).ravel(), 6)))
        content = content_key or volume_key(array, matrix)
        params = repr((window, roi_key, slice_range))
        key = hashlib.blake2b(f"{content}|{params}|{self.model_source}".encode(), digest_size=12).hexdigest()
        with self._lock:
            if key in self._volumes:
                self._volumes.move_to_end(key)
            else:
                handle = VolumeHandle(key, tuple(array.shape), window, roi, slice_range)  # type: ignore[arg-type]
                self._volumes[key] = _Volume(handle, array, matrix)
                while len(self._volumes) > self.max_volumes:
                    self._volumes.popitem(last=False)
            self._current = key
            return self.set_display(display_window, modality)

    def set_display(self, display_window: Union[DisplayWindow, tuple[float, float], None] = None,
                    modality: Optional[str] = None) -> VolumeHandle:
        """How the reader sees the current volume: its display window (Slicer's window/level, the DICOM
        WindowCenter/WindowWidth) and its DICOM Modality, as :meth:`set_volume` takes them. Nothing is recomputed
        here; the next task whose default window is the display window (report, VQA, retrieval) gets a view in the
        new window, the others keep theirs."""
        if display_window is not None and not isinstance(display_window, DisplayWindow):
            display_window = DisplayWindow(*display_window)
        with self._lock:
            handle = self._volume().handle
            handle.display_window = display_window
            handle.modality = modality or None
            return handle

    def forget_volume(self, key: Optional[str] = None) -> None:
        """Drop a volume's cached features (the current one by default)."""
        with self._lock:
            key = key or self._current
            self._volumes.pop(key, None)
            if key == self._current:
                self._current = None

    def _volume(self) -> _Volume:
        if self._current is None or self._current not in self._volumes:
            raise InputError("no volume is set; call set_volume(array, ijk_to_ras) first.")
        return self._volumes[self._current]

    def _view(self, task: Union[Task, str]) -> _View:
        """The volume as the model sees it for ``task`` (a Task or any of its names: its convention)."""
        volume = self._volume()
        task = task if isinstance(task, Task) else get_task(task)
        convention = self.convention or task.convention
        window = volume.window_for(task)
        view = volume.views.get((convention, window)) if self.caching else None
        if view is None:
            report_progress(self.progress, "preprocess", None,
                            f"resampling to {self.model_shape} ({convention}, {window.name})")
            h = volume.handle
            tensor, mapping = to_model_input(volume.array, volume.ijk_to_ras, window=window, roi=h.roi,
                                             slice_range=h.slice_range, model_shape=self.model_shape,
                                             convention=convention)
            images = torch.from_numpy(tensor)[None].to(self.device, self.dtype)
            view = _View(images=images, mapping=mapping)
            if self.caching:
                volume.views[(convention, window)] = view
        return view

    # ------------------------------------------------------------------------------------------ model plumbing
    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise CancelledError("cancelled by the user")

    def _image_features(self, view: _View) -> torch.Tensor:
        if view.image_features is None:
            self._check_cancel()
            report_progress(self.progress, "encode", None, "vision encoder")
            self.counters["vision_tower"] += 1
            with torch.no_grad():
                view.image_features = self.model.encode_images(view.images)
            self._check_cancel()
        return view.image_features

    def _seg_embedding(self, view: _View) -> torch.Tensor:
        if view.seg_embedding is None:
            self._check_cancel()
            report_progress(self.progress, "encode", None, "SegVol image encoder")
            self.counters["seg_encoder"] += 1
            with torch.no_grad():
                view.seg_embedding = self.model.model.seg_module.encode_image(view.images)
            self._check_cancel()
        return view.seg_embedding

    def _prefix_cache(self, view: _View, ids: torch.Tensor) -> Any:
        from transformers import DynamicCache

        if view.prefix_cache is None:
            n = self.model.num_image_tokens + 1
            cache = DynamicCache(config=self.model.config)
            self.counters["prefix"] += 1
            with torch.no_grad():
                self.model(input_ids=ids[:, :n], image_features=self._image_features(view), use_cache=True,
                           cache=cache)
            view.prefix_cache = cache
        return copy.deepcopy(view.prefix_cache)

    def _stopping_criteria(self) -> Any:
        from transformers import StoppingCriteriaList

        return StoppingCriteriaList([_CancelCriteria(self._cancel)])

    def _generate(self, view: _View, prompt: str, sampling: SamplingOptions, seg: bool,
                  on_text: Optional[TextCallback], output_scores: bool = False,
                  seg_prompt: bool = False) -> dict[str, Any]:
        from transformers import StoppingCriteriaList

        from .model import encode_prompt

        if self._batch is not None:  # inside run_batch: decoded together with the batch's other prompts
            batched = self._batch.generate(view, prompt, sampling, seg, output_scores, seg_prompt)
            if batched is not None:
                return batched

        ids = torch.tensor([encode_prompt(self.tokenizer, prompt, self.model.num_image_tokens)], device=self.device)
        features = self._image_features(view)
        kwargs = sampling.generate_kwargs()
        if self.caching and self.cache_prefix:
            kwargs["cache"] = self._prefix_cache(view, ids)
        if seg:
            kwargs["seg_image_embedding"] = self._seg_embedding(view) if self.caching else None
            kwargs["images"] = view.images
            if seg_prompt:
                kwargs["return_seg_prompt"] = True
        if output_scores:
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        streamer = _TextStreamer(self.tokenizer, on_text, self.progress, sampling.max_new_tokens)
        self.counters["generate"] += 1
        output = self.model.generate(input_ids=ids, image_features=features, seg_enable=seg, streamer=streamer,
                                     stopping_criteria=StoppingCriteriaList([_CancelCriteria(self._cancel)]),
                                     **kwargs)
        seg_logits = seg_prompts = None
        if seg:
            output, seg_logits, *rest = output
            seg_prompts = rest[0] if rest else None
        self._check_cancel()
        sequences = output if isinstance(output, torch.Tensor) else output.sequences

        result = {"ids": sequences[0].tolist(), "text": decode(self.tokenizer, sequences[0]), "seg_logits": seg_logits,
                  "seg_prompts": seg_prompts, "prompt_ids": ids}
        if output_scores:
            result["logits"] = torch.stack(output.logits, dim=1)[0]
        return result

    def _provenance(self, task: Task, prompt: str, view: Optional[_View], sampling: Optional[SamplingOptions],
                    started: float, analysis: Optional[AnalysisOptions] = None) -> Provenance:
        mapping = view.mapping if view is not None else None
        return Provenance(
            task=task.training_name, model=self.model_source, model_revision=self.model_revision,
            dtype=str(self.dtype).removeprefix("torch."), device=str(self.device), prompt=prompt,
            convention=f"{mapping.convention}@v{mapping.version}" if mapping is not None else None,
            intensity=json.dumps(mapping.intensity) if mapping is not None else None,  # JSON, not a repr
            sampling=sampling.to_dict() if sampling is not None else {},
            seed=sampling.seed if sampling is not None else None, duration_s=round(time.perf_counter() - started, 3),
            analysis=analysis.to_dict() if analysis is not None else {},
        )

    def _run(self, task: Task, prompt: str, sampling: Optional[SamplingOptions], on_text: Optional[TextCallback],
             analysis: Optional[AnalysisOptions] = None, fresh: bool = True
             ) -> tuple[dict[str, Any], _View, Provenance]:
        """Generate the answer (and what ``analysis`` asks of the model: scores, the [SEG] prompt, an evidence map).
        ``fresh=False``: a second request inside a running one (keeps a cancel that already came)."""
        sampling = sampling or SamplingOptions()
        analysis = task.check_analysis(analysis)
        started = time.perf_counter()
        with self._lock, translate_out_of_memory(self.device, self.dtype, self.model_source,
                                                 f"the {task.training_name} request"):
            if fresh and self._batch is None:  # a batch clears it once, so that a cancel during its planning holds
                self._cancel.clear()
            view = self._view(task)
            out = self._generate(view, prompt, sampling, task.segments, on_text, output_scores=analysis.confidence,
                                 seg_prompt=analysis.refine)
            out["started"] = started
            out["confidence"] = (confidence_.token_confidence(out["logits"], out["ids"], self.tokenizer)
                                 if analysis.confidence else None)
            out["evidence"] = self._evidence(view, out, analysis) if analysis.evidence else None
            return out, view, self._provenance(task, prompt, view, sampling, started, analysis)

    def _evidence(self, view: _View, out: dict[str, Any], analysis: AnalysisOptions) -> Any:
        from .evidence import explain_answer

        self.counters["evidence"] += 1
        report_progress(self.progress, "evidence", 0.0, f"evidence map ({analysis.evidence_steps} steps)")
        return explain_answer(self.model, view.images, view.mapping, out["prompt_ids"], out["ids"],
                              analysis.evidence_steps, check_cancel=self._check_cancel, progress=self.progress)

    @staticmethod
    def _analysed(out: dict[str, Any]) -> dict[str, Any]:
        """The result fields every model-generated answer may carry."""
        return {"confidence": out["confidence"], "evidence": out["evidence"]}

    # -------------------------------------------------------------------------------------------------- tasks
    def cancel(self) -> None:
        """Stop the running request at its next decoding step or encoder call (it raises CancelledError)."""
        self._cancel.set()

    def report(self, *, sampling: Optional[SamplingOptions] = None, on_text: Optional[TextCallback] = None,
               analysis: Optional[AnalysisOptions] = None) -> TextResult:
        """Report generation: findings text for the current volume."""
        prompt = REPORT.build_prompt()
        out, _, prov = self._run(REPORT, prompt, sampling, on_text, analysis)
        return TextResult(out["text"], prov, **self._analysed(out))

    def ask(self, question: str, history: Sequence[tuple[str, str]] = (), *,
            sampling: Optional[SamplingOptions] = None, on_text: Optional[TextCallback] = None,
            analysis: Optional[AnalysisOptions] = None) -> TextResult:
        """Open VQA. ``history`` = earlier (question, answer) turns (experimental: the model was trained on single
        turns). When the whole conversation does not fit in 512 tokens, the oldest turns are dropped and the
        result's provenance says so; a question that does not fit on its own is an InputError."""
        from .model import encode_prompt
        from .model.tokenizer import find_control_tokens

        history = list(history)
        dropped = 0
        while True:
            prompt = prompts.conversation_prompt(history, question) if history else ASK.build_prompt(question)
            try:
                encode_prompt(self.tokenizer, prompt, self.model.num_image_tokens)
                break
            except InputError:
                if not history or find_control_tokens(self.tokenizer, prompt):  # refused, never dropped with a turn
                    raise
                history.pop(0)
                dropped += 1
        out, _, prov = self._run(ASK, prompt, sampling, on_text, analysis)
        if dropped:
            prov.notes.append(f"dropped the {dropped} oldest turn(s) to fit the 512-token context")
        return TextResult(out["text"], prov, **self._analysed(out))

    def choose(self, question: str, choices: Sequence[str], *, sampling: Optional[SamplingOptions] = None,
               on_text: Optional[TextCallback] = None, analysis: Optional[AnalysisOptions] = None) -> ChoiceResult:
        """Closed VQA: which of ``choices`` (2 to 8; the model was trained with 4) answers the question. With
        confidence, each option's probability at the answer position (``result.confidence.choices``)."""
        prompt = CHOOSE.build_prompt(question, choices)
        clean_choices = prompts.validate_choices(choices)
        out, _, prov = self._run(CHOOSE, prompt, sampling, on_text, analysis)
        parsed = CHOOSE.parse_answer(out["text"], clean_choices)
        if out["confidence"] is not None and len(out.get("logits", ())):
            confidence_.add_choice_probabilities(out["confidence"], out["logits"][0], self.tokenizer, prompt,
                                                 prompts.CHOICE_LETTERS[: len(clean_choices)],
                                                 self.model.num_image_tokens)
        return ChoiceResult(out["text"], clean_choices, parsed.letter, parsed.choice, prov, parsed.error,
                            **self._analysed(out))

    def locate(self, expression: str, *, sampling: Optional[SamplingOptions] = None,
               on_text: Optional[TextCallback] = None, analysis: Optional[AnalysisOptions] = None) -> BoxResult:
        """Referring-expression comprehension: a 3D box (model coordinates and RAS ROI) for a target or description."""
        return self._locate(expression, sampling, on_text, analysis)

    def _locate(self, expression: str, sampling: Optional[SamplingOptions], on_text: Optional[TextCallback],
                analysis: Optional[AnalysisOptions], fresh: bool = True) -> BoxResult:
        prompt = LOCATE.build_prompt(expression)
        out, view, prov = self._run(LOCATE, prompt, sampling, on_text, analysis, fresh=fresh)
        parsed = LOCATE.parse_answer(out["text"])
        roi = box_to_roi(parsed.box, view.mapping) if parsed.box is not None else None
        return BoxResult(out["text"], expression, parsed.box, roi, prov, parsed.absent, parsed.error,
                         **self._analysed(out))

    def describe_region(self, roi: RasRoi, *, sampling: Optional[SamplingOptions] = None,
                        on_text: Optional[TextCallback] = None,
                        analysis: Optional[AnalysisOptions] = None) -> TextResult:
        """Referring-expression generation: what is inside a box drawn in RAS (e.g. a Slicer ROI).

        The ROI becomes the official box of the model voxels whose centres it holds (``roi_to_box(snap=True)``):
        every training box lay on that grid (d in k/32, h and w in k/256), so a hand-drawn ROI is asked about in the
        form the model learned; the prompt in the provenance shows the box sent."""
        with self._lock:
            box = roi_to_box(roi, self._view(DESCRIBE_REGION).mapping, snap=True)
        prompt = DESCRIBE_REGION.build_prompt(box)
        out, _, prov = self._run(DESCRIBE_REGION, prompt, sampling, on_text, analysis)
        return TextResult(out["text"], prov, **self._analysed(out))

    def segment(self, target: str, *, sampling: Optional[SamplingOptions] = None,
                on_text: Optional[TextCallback] = None,
                analysis: Optional[AnalysisOptions] = None) -> SegmentationResult:
        """Semantic segmentation of a named structure: a mask on the original voxel grid, with its box and
        measurements."""
        return self._segment(SEGMENT, target, sampling, on_text, analysis)

    def segment_expression(self, expression: str, *, sampling: Optional[SamplingOptions] = None,
                           on_text: Optional[TextCallback] = None,
                           analysis: Optional[AnalysisOptions] = None) -> SegmentationResult:
        """Referring-expression segmentation ("the lesion in the right lobe of the liver")."""
        return self._segment(SEGMENT_EXPRESSION, expression, sampling, on_text, analysis)

    def _segment(self, task: Task, target: str, sampling: Optional[SamplingOptions],
                 on_text: Optional[TextCallback], analysis: Optional[AnalysisOptions]) -> SegmentationResult:
        prompt = task.build_prompt(target)
        if not self.model.seg_enabled:
            raise InputError("this checkpoint has no segmentation module (segmentation_module: null in config.json).")
        analysis = task.check_analysis(analysis)
        with self._lock:  # the mask, its refinement and the REC box belong to this one request
            out, view, prov = self._run(task, prompt, sampling, on_text, analysis)
            parsed = task.parse_answer(out["text"])
            result = SegmentationResult(out["text"], target, None, prov, parsed.absent, parsed.error,
                                        **self._analysed(out))
            logits = out["seg_logits"]
            if parsed.has_seg and logits is not None and torch.isfinite(logits).any():
                report_progress(self.progress, "segment", None, "mapping the mask to the volume grid")
                self._mask(result, logits[0, 0], view.mapping, analysis)
                if analysis.refine and result.voxel_count:
                    if out["seg_prompts"] is None:  # a generate without the prompt hook (a wrapped model)
                        prov.notes.append("not refined: the model returned no [SEG] prompt embedding")
                    else:
                        self._refine(result, out["seg_prompts"], view, analysis)
                self._describe_mask(result, view)
            if analysis.locate:
                self._check_cancel()
                result.located = self._locate(target, sampling, None, AnalysisOptions(confidence=analysis.confidence),
                                              fresh=False)
                if result.located.box is not None and result.box is not None:
                    from .measurements import box_iou

                    result.located_iou = round(box_iou(result.located.box, result.box, view.mapping.model_shape), 4)
        prov.duration_s = round(time.perf_counter() - out["started"], 3)
        return result

    def _mask(self, result: SegmentationResult, logits: torch.Tensor, mapping: Any, analysis: AnalysisOptions) -> None:
        """The mask on the volume's grid (and its confidence, from the same resampling)."""
        values = logits.float().cpu().numpy()
        if analysis.confidence:
            result.mask, mask_confidence = confidence_.mask_with_confidence(values, mapping)
            result.confidence = confidence_.merge(result.confidence, mask=mask_confidence)
        else:
            result.mask = logits_to_mask(values, mapping)

    def _refine(self, result: SegmentationResult, seg_prompts: Optional[torch.Tensor], view: _View,
                analysis: AnalysisOptions) -> None:
        """Zoom-in refinement (:mod:`.refinement`): SegVol again on the region around the mask, same prompt."""
        from .refinement import describe, refine_logits

        volume = self._volume()
        seg_module = self.model.model.seg_module
        param = next(seg_module.parameters())

        def segment(tensor: np.ndarray, _mapping: Any) -> np.ndarray:
            self._check_cancel()
            report_progress(self.progress, "refine", None, "zoom-in: SegVol on the region around the mask")
            self.counters["seg_encoder_zoom"] += 1
            with torch.no_grad():
                images = torch.from_numpy(tensor)[None].to(param.device, param.dtype)
                logits = seg_module.decode(seg_module.encode_image(images), seg_prompts.to(param.dtype))
            return logits[0, 0].float().cpu().numpy()

        logits, mapping, record = refine_logits(volume.array, volume.ijk_to_ras, result.mask, view.mapping, segment)
        self._check_cancel()
        result.refinement = record
        self._mask(result, torch.from_numpy(logits), mapping, analysis)
        result.provenance.notes.append(describe(record))

    def _describe_mask(self, result: SegmentationResult, view: _View) -> None:
        """The mask's box (RAS and official) and measurements, on the volume's own voxels (HU for CT)."""
        from .measurements import describe_mask

        volume = self._volume()
        if volume.value_range is None:
            volume.value_range = (float(volume.array.min()), float(volume.array.max()))
        describe_mask(result, volume.array, volume.ijk_to_ras, view.mapping,
                      units="HU" if is_ct(volume.handle.modality, volume.value_range[0]) else None)

    def retrieve(self, *, texts: Optional[Sequence[str]] = None, text: Optional[str] = None,
                 volumes: Optional[Sequence[tuple[np.ndarray, np.ndarray]]] = None,
                 labels: Optional[Sequence[str]] = None,
                 display_windows: Optional[Sequence[Optional[DisplayWindow]]] = None,
                 modalities: Optional[Sequence[Optional[str]]] = None) -> RetrievalResult:
        """Image-text retrieval with M3D-CLIP: rank ``texts`` for the current volume, or ``volumes`` for ``text``.

        Window: the current volume's ``window`` when one was chosen, else each volume's default for retrieval
        (:attr:`.tasks.FIND_SIMILAR` ``.window``, the display window: M3D-CLIP learned from M3D-Cap's JPEGs) --
        for the current volume its display window and modality, for ``volumes`` the ``display_windows`` and
        ``modalities`` given with them (one per volume, None where unknown)."""
        from .retrieval import Retriever

        with self._lock:
            if self._retriever is None:
                self._retriever = Retriever(self.clip_source, device=self.device, dtype=self.dtype)
            current = self._volume() if self._current in self._volumes else None
            window = current.handle.window if current is not None else None
            if texts is not None:
                volume = self._volume()
                return self._retriever.rank_texts((volume.array, volume.ijk_to_ras), list(texts), labels=labels,
                                                  window=volume.window_for(FIND_SIMILAR))
            if text is not None and volumes is not None:
                return self._retriever.rank_volumes(text, list(volumes), labels=labels, window=window,
                                                    display_windows=display_windows, modalities=modalities)
        raise InputError("retrieve needs texts=[...] (ranked for the current volume) or text=... with volumes=[...].")

    # ------------------------------------------------------------------------------------------------- batches
    def run_batch(self, requests: Sequence[Any], *, sampling: Optional[SamplingOptions] = None,
                  batch_size: int = 8) -> list[Any]:
        """Run many task requests, ``batch_size`` prompts decoded together (:mod:`.batched`).

        ``requests``: :class:`~M3DAssistantLib.batched.BatchRequest` items, e.g.
        ``BatchRequest("report", volume=engine.set_volume(array, ijk_to_ras))`` or
        ``BatchRequest("segment", ("liver",), volume=handle)``; every task that generates can be batched, and one
        batch may mix tasks and volumes (the engine must still hold each volume: ``max_volumes`` >= the volumes in
        flight). Returns one item per request, in order: its result, exactly what the task method returns (greedy
        answers identical to one at a time), or the :class:`~M3DAssistantLib.errors.M3DError` that request's input
        raised (the others still run). Cancelling stops the whole batch."""
        from .batched import run_requests

        return run_requests(self, requests, sampling=sampling, batch_size=batch_size)

    # ----------------------------------------------------------------------------------------------- streaming
    def stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Union[str, Any]]:
        """Run a task method in a background thread and yield its text as it is generated, then the result.

        ``for item in engine.stream("report"): ...`` yields ``str`` chunks and finally the typed result; an error in
        the task is raised from the iterator.
        """
        if method not in {task.key for task in STREAMING_TASKS}:
            raise InputError(f"{method!r} is not a streamable task; use one of "
                             f"{', '.join(task.key for task in STREAMING_TASKS)}")
        items: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        func = getattr(self, method)

        def work() -> None:
            try:
                items.put(("result", func(*args, on_text=lambda t: items.put(("text", t)), **kwargs)))
            except BaseException as e:  # handed to the consumer thread
                items.put(("error", e))

        thread = threading.Thread(target=work, name=f"m3d-{method}", daemon=True)
        thread.start()
        while True:
            kind, value = items.get()
            if kind == "text":
                yield value
            elif kind == "result":
                yield value
                return
            else:
                raise value
