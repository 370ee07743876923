"""Batched decoding: many prompts (volumes x tasks) decoded together, with the answers one at a time would give.

Decoding reads every LLM weight once per generated token; a batch of B prompts reads them once for B tokens, so a
cohort decodes up to B times faster where decoding is memory-bound (CPU and GPU alike). Entry point:
:meth:`~M3DAssistantLib.engine.InferenceEngine.run_batch`.

How a chunk of requests runs, so that every task keeps exactly one way of building its prompt and its result:

1. *plan*: each request's ordinary task method runs (``engine.report()``, ``engine.segment(...)``) up to the point
   where it would generate; the engine hands that generation here (``engine._batch``), which records the row
   (view, prompt, segmentation or not) and stops the method (:class:`_Planned`). Bad input fails here, per request.
2. *generate*: the rows' missing image features, SegVol embeddings and prefix caches are computed in batches and
   kept as the single path keeps them; the prompts are left-padded (the positional image splice moves with each
   row's padding, see :meth:`~M3DAssistantLib.model.modeling_lamed.LamedMixin.splice_image_features`); transformers'
   ``generate`` computes the attention mask and position ids of the padded batch and stops each row at its EOS.
   Cached prefixes (first token + image features) fill the shared KV cache up to the longest prompt's image end;
   the rest is prefilled together.
3. *replay*: each method runs again and receives its row's output instead of generating, and builds its result as
   always. Provenance notes the batch.

Greedy answers are token for token those of batch size 1 (tested for every task, fp32, with rows that stop at
different lengths and rows that segment beside rows that do not); sampled answers draw different random numbers in
a batch than one at a time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .errors import CancelledError, InputError, M3DError
from .oom import translate_out_of_memory
from .progress import report_progress
from .results import SamplingOptions
from .tasks import STREAMING_TASKS

BATCH_METHODS = tuple(task.engine_method for task in STREAMING_TASKS)
"""The engine methods a batch can run: every task that generates text (retrieval is M3D-CLIP's, not decoding)."""


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """One prompt of a batch: an engine task method with its arguments, on a volume registered with ``set_volume``.

    ``BatchRequest("segment", ("liver",), volume=handle)`` is ``engine.segment("liver")`` on that volume;
    ``volume`` is the :class:`~M3DAssistantLib.engine.VolumeHandle` (or its ``key``); None: the current volume.
    Sampling options are the batch's (:meth:`~M3DAssistantLib.engine.InferenceEngine.run_batch`), not per request.
    """

    method: str
    args: tuple = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    volume: Any = None

    @property
    def volume_key(self) -> Optional[str]:
        return getattr(self.volume, "key", self.volume)


class _Planned(BaseException):
    """Stops a task method at its generation during planning (not an error: never escapes :func:`run_requests`)."""


@dataclasses.dataclass
class _Row:
    request: int  # index into the requests
    view: Any  # engine._View
    prompt: str
    seg: bool
    output_scores: bool
    seg_prompt: bool = False  # zoom-in refinement decodes the [SEG] prompt again


class _Batch:
    """What ``engine._generate`` talks to inside :func:`run_requests`: records rows, then hands out their outputs."""

    def __init__(self) -> None:
        self.rows: dict[int, _Row] = {}
        self.outputs: dict[int, dict[str, Any]] = {}
        self.current = -1
        self.replaying = False
        self.served: set[int] = set()  # requests whose row output the replay has handed out

    def generate(self, view: Any, prompt: str, sampling: SamplingOptions, seg: bool,
                 output_scores: bool = False, seg_prompt: bool = False) -> Optional[dict[str, Any]]:
        """Planning: record the row and stop the method. Replay: the row's output the first time; None for a second
        generation inside the same request (segment's ``locate`` option), which the engine then runs alone."""
        if self.replaying:
            if self.current in self.served:
                return None
            self.served.add(self.current)
            return self.outputs[self.current]
        self.rows[self.current] = _Row(self.current, view, prompt, seg, output_scores, seg and seg_prompt)
        raise _Planned


class _StepProgress:
    """A transformers streamer that reports one progress event per decoding step of the whole batch."""

    def __init__(self, engine: Any, rows: int, max_new_tokens: int):
        self.engine, self.rows, self.max_new_tokens = engine, rows, max(1, max_new_tokens)
        self.steps = -1  # the first put is the (empty) prompt

    def put(self, value: torch.Tensor) -> None:
        self.steps += 1
        if self.steps:
            report_progress(self.engine.progress, "generate", self.steps / self.max_new_tokens,
                   f"{self.steps} tokens x {self.rows} prompts")

    def end(self) -> None:
        pass


def run_requests(engine: Any, requests: Sequence[BatchRequest], sampling: Optional[SamplingOptions] = None,
                 batch_size: int = 8) -> list[Union[Any, M3DError]]:
    """:meth:`InferenceEngine.run_batch <M3DAssistantLib.engine.InferenceEngine.run_batch>` (see there)."""
    requests = list(requests)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number >= 1, not {batch_size!r}.")
    for request in requests:
        if not isinstance(request, BatchRequest):
            raise InputError(f"run_batch takes BatchRequest items, not {type(request).__name__}.")
        if request.method not in BATCH_METHODS:
            raise InputError(f"{request.method!r} cannot run in a batch; use one of {', '.join(BATCH_METHODS)}.")
    sampling = sampling or SamplingOptions()
    results: list[Any] = [None] * len(requests)
    with engine._lock:
        previous = engine._current
        engine._cancel.clear()
        try:
            for start in range(0, len(requests), batch_size):
                _run_chunk(engine, requests, range(start, min(start + batch_size, len(requests))), sampling, results)
        finally:
            engine._batch = None
            engine._current = previous if previous in engine._volumes else None
    return results


def _call(engine: Any, request: BatchRequest, sampling: SamplingOptions) -> Any:
    key = request.volume_key
    if key is not None:
        if key not in engine._volumes:
            raise InputError(f"volume {key} is no longer held by the engine (it keeps the {engine.max_volumes} most "
                             "recent); set it again, or make max_volumes at least the batch size.")
        engine._current = key
    return getattr(engine, request.method)(*request.args, sampling=sampling, **dict(request.kwargs))


def _run_chunk(engine: Any, requests: list[BatchRequest], indices: range, sampling: SamplingOptions,
               results: list[Any]) -> None:
    started = time.perf_counter()
    batch = engine._batch = _Batch()
    for i in indices:  # 1. plan
        batch.current = i
        try:
            _call(engine, requests[i], sampling)
            raise InputError(f"internal: {requests[i].method} returned without generating")
        except _Planned:
            pass
        except CancelledError:
            raise
        except M3DError as error:  # this request's input is bad: the others still run
            results[i] = error
    if engine._cancel.is_set():
        raise CancelledError("cancelled by the user")
    rows = list(batch.rows.values())
    if not rows:
        return
    what = f"a batch of {len(rows)} requests (try a smaller batch size)"
    with translate_out_of_memory(engine.device, engine.dtype, engine.model_source, what):
        for row, output in zip(rows, _generate_rows(engine, rows, sampling)):  # 2. generate
            batch.outputs[row.request] = output
    seconds = round(time.perf_counter() - started, 3)
    batch.replaying = True
    for row in rows:  # 3. replay: the methods build their results from their rows' outputs
        batch.current = row.request
        try:
            result = _call(engine, requests[row.request], sampling)
        except CancelledError:
            raise
        except M3DError as error:
            results[row.request] = error
            continue
        result.provenance.duration_s = seconds
        result.provenance.notes.append(f"decoded in a batch of {len(rows)} prompts ({seconds} s for the batch)")
        results[row.request] = result


# ---------------------------------------------------------------------------------------------------- generation
def _unique_views(rows: Sequence[_Row]) -> list[Any]:
    seen: dict[int, Any] = {}
    for row in rows:
        seen.setdefault(id(row.view), row.view)
    return list(seen.values())


def _fill_image_features(engine: Any, views: Sequence[Any]) -> None:
    """Vision tower + projector for the views that have no image tokens yet, ``len(views)`` volumes per call."""
    missing = [v for v in views if v.image_features is None]
    if not missing:
        return
    engine._check_cancel()
    report_progress(engine.progress, "encode", None, f"vision encoder ({len(missing)} volumes)")
    engine.counters["vision_tower"] += len(missing)
    features = engine.model.encode_images(torch.cat([v.images for v in missing]))
    for view, feature in zip(missing, features.split(1)):
        view.image_features = feature
    engine._check_cancel()


def _seg_embeddings(engine: Any, views: Sequence[Any]) -> list[torch.Tensor]:
    """SegVol image embeddings of ``views``, computed once per view (kept with it when the engine caches)."""
    missing = list({id(v): v for v in views if v.seg_embedding is None}.values())
    if missing:
        engine._check_cancel()
        report_progress(engine.progress, "encode", None, f"SegVol image encoder ({len(missing)} volumes)")
        engine.counters["seg_encoder"] += len(missing)
        seg_module = engine.model.model.seg_module
        param = next(seg_module.parameters())
        embeddings = seg_module.encode_image(torch.cat([v.images for v in missing]).to(param.device, param.dtype))
        for view, embedding in zip(missing, embeddings.split(1)):
            view.seg_embedding = embedding
        engine._check_cancel()
    return [v.seg_embedding for v in views]


def _fill_prefix_caches(engine: Any, views: Sequence[Any], prefix_ids: torch.Tensor) -> None:
    """KV caches of the first token + image features for the views without one: one forward for all of them."""
    from transformers import DynamicCache

    missing = [v for v in views if v.prefix_cache is None]
    if not missing:
        return
    cache = DynamicCache(config=engine.model.config)
    engine.counters["prefix"] += len(missing)
    engine.model(input_ids=prefix_ids.expand(len(missing), -1), use_cache=True, cache=cache,
                 image_features=torch.cat([v.image_features for v in missing]))
    for i, view in enumerate(missing):
        own = DynamicCache(config=engine.model.config)
        for layer, stored in enumerate(cache.layers):
            own.update(stored.keys[i : i + 1].clone(), stored.values[i : i + 1].clone(), layer)
        view.prefix_cache = own


def _shared_prefix_cache(engine: Any, rows: Sequence[_Row], padding: torch.Tensor, length: int) -> Any:
    """A cache over slots 0..length-1 of the left-padded batch, from each row's own prefix cache: row ``i`` holds
    zeros on its padding (masked) and its prefix's first ``length - padding[i]`` positions after it."""
    from transformers import DynamicCache

    cache = DynamicCache(config=engine.model.config)
    first = rows[0].view.prefix_cache
    for layer in range(len(first.layers)):
        stored = first.layers[layer].keys
        keys = stored.new_zeros((len(rows), stored.shape[1], length, stored.shape[3]))
        values = torch.zeros_like(keys)
        for i, row in enumerate(rows):
            pad = int(padding[i])
            if pad >= length:  # this row's prompt starts after the shared slots: it is prefilled whole
                continue
            own = row.view.prefix_cache.layers[layer]
            keys[i, :, pad:] = own.keys[0, :, : length - pad]
            values[i, :, pad:] = own.values[0, :, : length - pad]
        cache.update(keys, values, layer)
    return cache


def _eos_ids(engine: Any) -> set[int]:
    eos = engine.model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _generate_rows(engine: Any, rows: Sequence[_Row], sampling: SamplingOptions) -> list[dict[str, Any]]:
    """One ``generate`` call for all rows; per row what ``engine._generate`` returns for it alone."""
    from .model import encode_prompt
    from .model.tokenizer import decode

    model, tokenizer = engine.model, engine.tokenizer
    n_image = model.num_image_tokens
    prompts = [encode_prompt(tokenizer, row.prompt, n_image) for row in rows]
    length = max(len(p) for p in prompts)
    pad_id = model.generation_config.pad_token_id
    device = engine.device
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):  # left padding: every prompt ends at the last slot
        ids[i, length - len(prompt):] = torch.tensor(prompt, device=device)
        mask[i, length - len(prompt):] = 1
    padding = length - torch.tensor([len(p) for p in prompts])

    with torch.no_grad():
        views = _unique_views(rows)
        _fill_image_features(engine, views)
        features = torch.cat([row.view.image_features for row in rows])
        kwargs = sampling.generate_kwargs()
        if engine.caching and engine.cache_prefix:
            _fill_prefix_caches(engine, views, torch.tensor([prompts[0][: n_image + 1]], device=device))
            # slots every row has cached: up to the end of the image of the longest (least padded) prompt
            cached = min(int(padding.min()) + n_image + 1, length - 1)
            kwargs["cache"] = _shared_prefix_cache(engine, rows, padding, cached)
        seg_rows = torch.tensor([row.seg for row in rows], dtype=torch.bool)
        if seg_rows.any():
            kwargs["seg_enable"] = seg_rows
            kwargs["seg_image_embedding"] = torch.cat(_seg_embeddings(engine, [r.view for r in rows if r.seg]))
            if any(row.seg_prompt for row in rows):
                kwargs["return_seg_prompt"] = True
        output_scores = any(row.output_scores for row in rows)
        if output_scores:
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        engine.counters["generate"] += 1
        engine.counters["batched_rows"] += len(rows)
        output = model.generate(input_ids=ids, attention_mask=mask, image_features=features,
                                streamer=_StepProgress(engine, len(rows), sampling.max_new_tokens),
                                stopping_criteria=engine._stopping_criteria(), **kwargs)
    seg_logits = seg_prompts = None
    if seg_rows.any():
        output, seg_logits, *rest = output
        seg_prompts = rest[0] if rest else None
    engine._check_cancel()
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    logits = torch.stack(output.logits, dim=1) if output_scores else None  # [B, T, vocab]
    eos = _eos_ids(engine)
    outputs = []
    for i, row in enumerate(rows):
        row_ids = sequences[i].tolist()
        # a row that stopped early is padded after its EOS; keep what it generated, its EOS included
        end = next((t + 1 for t, token in enumerate(row_ids) if token in eos), len(row_ids))
        out = {"ids": row_ids[:end], "text": decode(tokenizer, row_ids[:end]),
               "seg_logits": seg_logits[i : i + 1] if row.seg else None,
               "seg_prompts": seg_prompts[i : i + 1] if row.seg_prompt and seg_prompts is not None else None,
               "prompt_ids": torch.tensor([prompts[i]], device=device)}  # unpadded, as engine._generate gives
        if row.output_scores:
            out["logits"] = logits[i, :end]
        outputs.append(out)
    return outputs
