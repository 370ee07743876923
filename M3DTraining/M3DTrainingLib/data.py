"""Training samples from an exported dataset folder (:mod:`.export`): a task-mixed torch Dataset and its collator.

Prompts are built with the SAME builders inference uses (:mod:`M3DAssistantLib.prompts`), so a fine-tuned model is
asked at inference exactly what it was taught; the answers follow the official templates:

=============  ====================================================  ==============================================
task           prompt (after the image tokens)                       answer
=============  ====================================================  ==============================================
report         ``Please generate a medical report ...``              the report
vqa_open       `` <question>``                                       the answer
vqa_closed     `` <question> Choices: A. .. B. .. C. .. D. ..``      ``C. Liver``
rec            `` Where is <target> in this image? ...``             ``Coordinates are <bx_start>[..]<bx_end>.``
                                                                     (absent: ``Sorry, there is no <target>.``)
reg            `` What target is present within ... <box> ?``        ``The target is <target>.``
seg            `` What is <target> in this image? ... mask.``        ``It is [SEG].`` (absent: ``Sorry, ...``)
refseg         `` <expression> Please answer and segment.``          ``The target is <target> and the segmentation
                                                                     mask is [SEG].`` (or the annotated answer)
=============  ====================================================  ==============================================

A sequence is the tokenizer's ids of ``<im_patch> * N + prompt + " " + answer`` (the official ``question + ' ' +
answer``, with a BOS in front only where the tokenizer adds one, exactly as :func:`encode_prompt` at inference),
then EOS; at most ``max_length`` tokens (longer ones are cut and lose the EOS, as in the official datasets);
``labels`` are -100 on the prompt (BOS, image tokens, question) and padding, and the token ids on the answer and EOS.

Augmentation (training split only, as the official datasets; MONAI transforms with the official parameters):
RandRotate90 in the H-W plane (p 0.5), RandFlip on D, H and W (p 0.1 each), applied to image and mask together;
RandScaleIntensity (0.1, p 0.5) and RandShiftIntensity (0.1, p 0.5) on the image. Box text is written AFTER the
transform: from the transformed mask, or, for a box without a mask, from the box's voxels transformed the same way --
so a flipped image gets a flipped box. Samples whose text states laterality ("left kidney") get no flip and no
rotation (both would swap left and right in the image but not in the text) unless ``flip_laterality=True``.
Randomness is drawn per item from ``(seed, epoch, index)``: the same item gives the same sample in every run and
every DataLoader worker (call :meth:`M3DDataset.set_epoch` each epoch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from M3DAssistantLib import prompts
from M3DAssistantLib.errors import InputError
from M3DAssistantLib.geometry import Box, mask_to_box
from M3DAssistantLib.model.tokenizer import MAX_SEQUENCE_LENGTH, SEG_TOKEN, encode_prompt, find_control_tokens

from .export import (  # the dataset's task names
    DATASET_FORMAT,
    DATASET_VERSION,
    REC,
    REFSEG,
    REG,
    REPORT,
    SEG,
    TASKS,
    VQA_CLOSED,
    VQA_OPEN,
    box_text,
)

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "Example",
    "M3DDataset",
    "answer_text",
    "collate",
    "states_laterality",
]

IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")

# Answer templates (official wording, BAAI-DCAI/M3D LaMed/src/dataset/multi_dataset.py and prompt_templates.py).
REC_ANSWER = "Coordinates are {box}."
REG_ANSWER = "The target is {target}."
SEG_ANSWER = f"It is {SEG_TOKEN}."
REFSEG_ANSWER = f"The target is {{target}} and the segmentation mask is {SEG_TOKEN}."
ABSENT_ANSWER = "Sorry, there is no {target}."
CLOSED_ANSWER = "{letter}. {answer}"

_LATERALITY = re.compile(r"(?<![a-z])(left|right)(?![a-z])", re.IGNORECASE)


def states_laterality(*texts: Optional[str]) -> bool:
    """Whether any text names a side ("left kidney", "kidney_right"): such samples are not flipped or rotated."""
    return any(t and _LATERALITY.search(t.replace("_", " ")) for t in texts)


def answer_text(task: str, target: Optional[str] = None, box: Optional[Sequence[float]] = None,
                answer: Optional[str] = None, letter: Optional[str] = None) -> str:
    """The training answer of a task (module docstring table); ``box`` None for rec/seg means the target is absent."""
    if task in (REPORT, VQA_OPEN):
        return " ".join(str(answer).split())
    if task == VQA_CLOSED:
        return CLOSED_ANSWER.format(letter=letter, answer=answer)
    if task == REC:
        return REC_ANSWER.format(box=box_text(box)) if box is not None else ABSENT_ANSWER.format(target=target)
    if task == REG:
        return REG_ANSWER.format(target=target) if box is not None else ABSENT_ANSWER.format(target=target)
    if task == SEG:
        return SEG_ANSWER if box is not None else ABSENT_ANSWER.format(target=target)
    if task == REFSEG:
        return answer if answer else REFSEG_ANSWER.format(target=target)
    raise InputError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")


def prompt_text(task: str, record: dict[str, Any], box: Optional[Sequence[float]]) -> str:
    """The prompt after the image tokens, from the inference prompt builders."""
    if task == REPORT:
        return prompts.report_prompt()
    if task == VQA_OPEN:
        return prompts.question_prompt(record["Question"])
    if task == VQA_CLOSED:
        return prompts.choice_prompt(record["Question"], _choices(record))
    if task == REC or (task == REG and box is None):  # official REG without a target: the REC question
        return prompts.locate_prompt(record["target"])
    if task == REG:
        return prompts.describe_region_prompt(box)
    if task == SEG:
        return prompts.segment_prompt(record["target"])
    if task == REFSEG:
        return prompts.segment_expression_prompt(record["Question"])
    raise InputError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")


def _choices(record: dict[str, Any]) -> list[str]:
    out = []
    for letter in prompts.CHOICE_LETTERS:
        value = record.get(f"Choice {letter}")
        if value is None or str(value).strip() == "":
            break
        out.append(str(value))
    return out


@dataclasses.dataclass
class Example:
    """One sample before tokenisation (after augmentation)."""

    task: str
    question: str  # the prompt after the image tokens
    answer: str
    image: torch.Tensor  # [1, D, H, W] float32
    segs: torch.Tensor  # [1, D, H, W] float32, zeros unless seg/refseg with a mask
    mask: Optional[torch.Tensor]  # [1, D, H, W] bool: the (augmented) mask or box region the box text comes from
    box: Optional[Box]  # the box in the text (after augmentation); None when absent or not a box task
    target: Optional[str]
    spatial_augment: bool  # whether flips/rotations were allowed for this sample


class M3DDataset(torch.utils.data.Dataset):
    """Task-mixed instruction samples from a dataset folder written by :func:`~.export.export_dataset`.

    Args:
        folder: the dataset folder (with ``dataset.json``).
        tokenizer: the checkpoint's tokenizer as :func:`M3DAssistantLib.model.load_model` returns it (it carries
            ``m3d_special_tokens``).
        num_image_tokens: image tokens of the model (``model.num_image_tokens``; 256 for the released models).
        split: "train", "validation" or "test".
        tasks: the tasks to include (default: every task the split has), from :data:`TASKS`.
        augment: official augmentations; applied on the "train" split only.
        seed: base of the per-item randomness (with the epoch and the index).
        max_length: longest sequence (512, as the released models were trained).
        flip_laterality: also flip/rotate samples whose text names a side.

    Items are dicts: ``images`` [1,D,H,W] float32, ``input_ids`` [L] long, ``labels`` [L] long, ``attention_mask``
    [L] long, ``segs`` [1,D,H,W] float32, ``task`` str. Batch them with :meth:`collate`.
    """

    def __init__(
        self,
        folder: Union[str, Path],
        tokenizer: Any,
        num_image_tokens: int,
        split: str = "train",
        tasks: Optional[Iterable[str]] = None,
        augment: bool = True,
        seed: int = 0,
        max_length: int = MAX_SEQUENCE_LENGTH,
        flip_laterality: bool = False,
    ):
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        if split not in SPLITS:
            raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if getattr(tokenizer, "m3d_special_tokens", None) is None:
            raise InputError("the tokenizer lacks the M3D token ids; load it with M3DAssistantLib.model.load_model "
                             "(or model.tokenizer.load_tokenizer) from the checkpoint folder")
        if int(num_image_tokens) < 1:
            raise InputError(f"num_image_tokens must be positive (the model's image tokens), got {num_image_tokens}")
        self.tokenizer = tokenizer
        self.num_image_tokens = int(num_image_tokens)
        self.split = split
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.epoch = 0
        self.flip_laterality = bool(flip_laterality)
        self.model_shape: tuple[int, int, int] = tuple(int(v) for v in self.manifest["model_shape"])  # type: ignore
        available = [t for t in TASKS if self.manifest.get(t, {}).get(split)]
        if tasks is None:
            self.tasks = available
        else:
            self.tasks = list(dict.fromkeys(tasks))
            unknown = [t for t in self.tasks if t not in TASKS]
            if unknown:
                raise InputError(f"unknown task(s) {unknown}; the tasks are {', '.join(TASKS)}")
        self.samples: list[tuple[str, dict[str, Any]]] = [
            (t, r) for t in self.tasks for r in self.manifest.get(t, {}).get(split, [])
        ]
        if not self.samples:
            raise InputError(f"{self.folder}: no {split} samples for the tasks {self.tasks or list(TASKS)} "
                             f"(the dataset has {', '.join(available) or 'none'} in this split)")
        self.augment = bool(augment) and split == "train"
        self._texts: dict[str, str] = {}
        self._full_transform, self._intensity_transform = _augmentations(self.model_shape) if self.augment \
            else (None, None)
        self.truncated = self._check_lengths()

    # ------------------------------------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Draw different augmentations in each epoch (reproducibly)."""
        self.epoch = int(epoch)

    @property
    def task_counts(self) -> dict[str, int]:
        counts = {t: 0 for t in self.tasks}
        for t, _ in self.samples:
            counts[t] += 1
        return counts

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.m3d_special_tokens.pad)

    def collate(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """:func:`collate` with this tokenizer's pad id."""
        return collate(batch, pad_token_id=self.pad_token_id)

    # ------------------------------------------------------------------------------------------------ samples
    def _path(self, rel: str) -> Path:
        path = (self.folder / rel).resolve()
        if self.folder.resolve() not in path.parents:
            raise InputError(f"{self.folder}/dataset.json names {rel!r}, outside the dataset folder")
        return path

    def _record_texts(self, task: str, record: dict[str, Any]) -> dict[str, Any]:
        """Text fields of a record, the report read from its file."""
        if task == REPORT:
            rel = record["text"]
            if rel not in self._texts:
                self._texts[rel] = " ".join(self._path(rel).read_text(encoding="utf-8").split())
            return {"answer": self._texts[rel]}
        if task in (VQA_OPEN, VQA_CLOSED):
            return {"answer": str(record["Answer"]), "letter": record.get("Answer Choice")}
        if task == REFSEG:
            return {"answer": record.get("Answer"), "target": record.get("target")}
        return {"target": record.get("target")}

    def _check_lengths(self) -> int:
        """Every prompt must leave room for its answer; count the answers that will be cut."""
        truncated, too_long, control = 0, [], []
        for i, (task, record) in enumerate(self.samples):
            fields = self._record_texts(task, record)
            box = record.get("box")
            question = prompt_text(task, record, box)
            answer = answer_text(task, box=box, **fields)
            found = find_control_tokens(self.tokenizer, f"{question} {answer}")
            if found:
                control.append(f"{task} #{i} ({record.get('node', '')}): {', '.join(map(repr, found))}")
                continue
            try:
                prompt_ids, full_ids = self._token_ids(question, answer)
            except InputError as e:
                too_long.append(f"{task} #{i} ({record.get('node', '')}): {e}")
                continue
            if len(full_ids) + 1 > self.max_length:
                truncated += 1
        if control:
            raise InputError(f"{self.folder}: {len(control)} sample(s) contain control tokens of the base model's "
                             f"tokenizer, which the model would read as instructions (end of text, a chat turn), not "
                             f"as text: {'; '.join(control[:5])}. Edit those texts in the scene and export again.")
        if too_long:
            raise InputError(f"{len(too_long)} prompt(s) leave no room for the answer in {self.max_length} tokens: "
                             + "; ".join(too_long[:5]))
        if truncated:
            log.warning("%d of %d %s samples are longer than %d tokens; their answers are cut (as the official "
                        "datasets do)", truncated, len(self.samples), self.split, self.max_length)
        return truncated

    def _rng_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])

    def example(self, index: int) -> Example:
        """Sample ``index`` as texts and tensors (augmented when the dataset augments)."""
        task, record = self.samples[index]
        fields = self._record_texts(task, record)
        image = self._load_array(record.get("image") or record.get("Image Path") or record.get("Image"), "image")
        mask_rel = record.get("label") or record.get("Mask")
        mask = None
        if mask_rel:
            mask = self._load_array(mask_rel, "mask") != 0
        elif record.get("box") is not None:
            mask = _box_region(record["box"], self.model_shape)  # transformed like a mask, exactly
        question_fields = [record.get(k) for k in ("Question", "Answer", "target")] + [fields.get("answer")]
        spatial = self.flip_laterality or not states_laterality(*question_fields)

        image_t = torch.from_numpy(np.array(image, dtype=np.float32, copy=True))
        mask_t = None if mask is None else torch.from_numpy(np.array(mask, dtype=np.uint8, copy=True))
        if self.augment:
            transform = self._full_transform if spatial else self._intensity_transform
            transform.set_random_state(seed=self._rng_seed(index))
            data = {"image": image_t} if mask_t is None else {"image": image_t, "seg": mask_t}
            data = transform(data)
            image_t = _plain(data["image"]).float().contiguous()
            if mask_t is not None:
                mask_t = _plain(data["seg"]).contiguous()
        mask_b = None if mask_t is None else mask_t != 0
        box = mask_to_box(mask_b) if mask_b is not None else None
        question = prompt_text(task, record, box)
        answer = answer_text(task, box=box, **fields)
        if task in (SEG, REFSEG) and mask_b is not None:
            segs = mask_b.to(torch.float32)
        else:
            segs = torch.zeros_like(image_t)
        return Example(task, question, answer, image_t, segs, mask_b, box, record.get("target"), spatial)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.example(index)
        input_ids, labels = self.encode(ex.question, ex.answer)
        return {
            "images": ex.image,
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": torch.ones_like(input_ids),
            "segs": ex.segs,
            "task": ex.task,
        }

    # ------------------------------------------------------------------------------------------------ tokens
    def _token_ids(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        prompt_ids = encode_prompt(self.tokenizer, question, self.num_image_tokens, max_length=self.max_length - 1)
        full_ids = encode_prompt(self.tokenizer, f"{question} {answer}", self.num_image_tokens, max_length=1 << 30)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            log.debug("the prompt's last token merges with the answer in %r", question[-30:])
        return prompt_ids, full_ids

    def encode(self, question: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of ``image tokens + question + " " + answer + EOS`` (after a BOS where the tokenizer
        adds one); labels -100 on the prompt. Cut to ``max_length`` (without EOS then), as the official datasets."""
        prompt_ids, full_ids = self._token_ids(question, answer)
        ids = full_ids + [int(self.tokenizer.m3d_special_tokens.eos)]
        ids = ids[: self.max_length]
        labels = list(ids)
        labels[: len(prompt_ids)] = [IGNORE_INDEX] * len(prompt_ids)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    # ------------------------------------------------------------------------------------------------ files
    def _load_array(self, rel: Optional[str], what: str) -> np.ndarray:
        if not rel:
            raise InputError(f"{self.folder}: a sample has no {what} file")
        path = self._path(rel)
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read the {what} ({e}); re-export the dataset") from None
        if array.shape != (1, *self.model_shape):
            raise InputError(f"{path}: the {what} has shape {array.shape}, the dataset's model shape is "
                             f"{(1, *self.model_shape)}; re-export the dataset")
        return array


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "dataset.json"
    if not path.is_file():
        raise InputError(f"{folder} is not an M3D dataset folder (no dataset.json); export one from annotated scenes "
                         "first (M3DTrainingLib.export.export_dataset)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path} cannot be read ({e}); re-export the dataset") from None
    if manifest.get("format") != DATASET_FORMAT or manifest.get("version") != DATASET_VERSION:
        raise InputError(f"{path} is not a {DATASET_FORMAT} version {DATASET_VERSION} manifest (format "
                         f"{manifest.get('format')!r}, version {manifest.get('version')!r}); re-export the dataset")
    return manifest


def _box_region(box: Sequence[float], model_shape: Sequence[int]) -> np.ndarray:
    """The voxels a box names (official boxes are first/last voxel index / size), as a [1, D, H, W] mask."""
    b = np.asarray(box, dtype=np.float64)
    n = np.asarray(model_shape)
    lo = np.clip(np.rint(b[:3] * n), 0, n - 1).astype(int)
    hi = np.clip(np.rint(b[3:] * n), 0, n - 1).astype(int)
    region = np.zeros((1, *model_shape), dtype=bool)
    region[0, lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    return region


def _plain(x: Any) -> torch.Tensor:
    """MONAI returns MetaTensors; the model wants plain tensors."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _augmentations(model_shape: Sequence[int]):
    """(all official transforms, intensity-only transforms) as MONAI Compose objects."""
    from monai.transforms import Compose, RandFlipd, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd

    keys = ["image", "seg"]
    spatial = []
    if model_shape[1] == model_shape[2]:
        spatial.append(RandRotate90d(keys=keys, prob=0.5, spatial_axes=(1, 2), allow_missing_keys=True))
    else:
        log.warning("model shape %s is not square in H-W: the 90-degree rotation is left out", tuple(model_shape))
    spatial += [RandFlipd(keys=keys, prob=0.10, spatial_axis=axis, allow_missing_keys=True) for axis in (0, 1, 2)]
    intensity = [RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                 RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)]
    return Compose(spatial + intensity), Compose(intensity)


def collate(batch: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Stack items of :class:`M3DDataset`, padding the token sequences on the right to the longest one.

    Returns ``images`` [B,1,D,H,W], ``input_ids`` [B,L] (padded with ``pad_token_id``), ``labels`` [B,L] (-100 on
    padding), ``attention_mask`` [B,L] (0 on padding), ``segs`` [B,1,D,H,W] and ``task`` (list of str).
    """
    if not batch:
        raise InputError("cannot collate an empty batch")
    length = max(int(item["input_ids"].shape[0]) for item in batch)
    n = len(batch)
    input_ids = torch.full((n, length), int(pad_token_id), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, item in enumerate(batch):
        k = int(item["input_ids"].shape[0])
        input_ids[i, :k] = item["input_ids"]
        labels[i, :k] = item["labels"]
        attention_mask[i, :k] = item["attention_mask"]
    shapes = {tuple(item["images"].shape) for item in batch}
    if len(shapes) > 1:
        raise InputError(f"the batch mixes image shapes {sorted(shapes)}; use one dataset (one model shape) per run")
    return {
        "images": torch.stack([item["images"] for item in batch]),
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "segs": torch.stack([item["segs"] for item in batch]),
        "task": [item["task"] for item in batch],
    }
