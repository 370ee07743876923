"""A tiny synthetic dataset in the item format of ``M3DTrainingLib.data.M3DDataset``, for training tests.

Items: ``images`` [1, D, H, W] in [0, 1], ``input_ids`` / ``labels`` / ``attention_mask`` [L] (labels -100 on
BOS + image tokens + question), ``segs`` [1, D, H, W] (zeros when the sample has no mask), ``task``.
Every item has the same length and the same number of answer tokens, so the mean loss of a batch is the mean of
its halves' means (what a DDP comparison needs). Everything is a function of (seed, index): deterministic.

Used by the training tests through ``dataset_factory: "training_synthetic:SyntheticM3DDataset"`` (the tests put
this folder on PYTHONPATH for the subprocesses they launch).
"""

from __future__ import annotations

import time

import torch


class SyntheticM3DDataset(torch.utils.data.Dataset):
    def __init__(self, folder, tokenizer, num_image_tokens, split="train", augment=False, seed=0, *,
                 size=8, image_size=(16, 64, 64), question_tokens=6, answer_tokens=5, masks="all",
                 delay_s=0.0):
        special = tokenizer.m3d_special_tokens
        self.special = special
        self.num_image_tokens = num_image_tokens
        self.size = size
        self.image_size = tuple(image_size)
        self.question_tokens = question_tokens
        self.answer_tokens = answer_tokens
        self.masks = masks
        self.delay_s = delay_s
        self.seed = seed
        self.vocab = (3, min(len(tokenizer), 900))  # ordinary SentencePiece pieces only

    def __len__(self) -> int:
        return self.size

    def has_mask(self, index: int) -> bool:
        return self.masks == "all" or (self.masks == "half" and index % 2 == 0)

    def __getitem__(self, index: int) -> dict:
        if self.delay_s:
            time.sleep(self.delay_s)
        g = torch.Generator().manual_seed(self.seed * 1000 + index)
        d, h, w = self.image_size
        image = torch.rand(1, d, h, w, generator=g) * 0.2
        seg = torch.zeros(1, d, h, w)
        # a bright box; its mask is the box (learnable from the image)
        z0, y0, x0 = (int(torch.randint(0, s // 2, (1,), generator=g)) for s in (d, h, w))
        box = (slice(None), slice(z0, z0 + d // 3), slice(y0, y0 + h // 3), slice(x0, x0 + w // 3))
        image[box] += 0.7
        question = torch.randint(*self.vocab, (self.question_tokens,), generator=g)
        answer = torch.randint(*self.vocab, (self.answer_tokens,), generator=g)
        if self.has_mask(index):
            seg[box] = 1.0
            answer[-1] = self.special.seg  # "... [SEG]"
        prompt = torch.cat([torch.tensor([self.special.bos]),
                            torch.full((self.num_image_tokens,), self.special.image), question])
        input_ids = torch.cat([prompt, answer, torch.tensor([self.special.eos])])
        labels = input_ids.clone()
        labels[: len(prompt)] = -100
        return {
            "images": image,
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": torch.ones_like(input_ids),
            "segs": seg,
            "task": "seg" if self.has_mask(index) else "vqa",
        }


def collate(batch: list[dict]) -> dict:
    out = {key: torch.stack([item[key] for item in batch]) for key in batch[0] if key != "task"}
    out["task"] = [item["task"] for item in batch]
    return out
