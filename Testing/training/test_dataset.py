"""data.py: M3DDataset and collate on a small dataset folder in the export layout -- box text written after the
augmentation (from the augmented mask, or from the box's voxels), image and mask transformed together, labels -100
exactly on prompt and padding, the laterality rule, determinism per (seed, epoch, index), length limits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dataset_folders import N_IMAGE, SHAPE, write_dataset

from M3DAssistantLib.errors import InputError
from M3DAssistantLib.geometry import mask_to_box
from M3DAssistantLib.model.tokenizer import encode_prompt, load_tokenizer
from M3DTrainingLib.data import IGNORE_INDEX, M3DDataset, collate, states_laterality


@pytest.fixture(scope="module")
def tokenizer(tiny_phi3):
    config = json.loads((tiny_phi3 / "config.json").read_text())
    tok, _ = load_tokenizer(tiny_phi3, config["seg_token_id"], config["vocab_size"])
    return tok


@pytest.fixture
def folder(tmp_path):
    return write_dataset(tmp_path / "ds")


def index_of(dataset, task, predicate=lambda r: True):
    return next(i for i, (t, r) in enumerate(dataset.samples) if t == task and predicate(r))


def test_box_text_is_written_from_the_augmented_mask(folder, tokenizer):
    dataset = M3DDataset(folder, tokenizer, N_IMAGE, seed=5)
    liver_rec = index_of(dataset, "rec", lambda r: r["label"] and r["target"] == "liver")
    liver_reg = index_of(dataset, "reg", lambda r: r["label"])
    original = mask_to_box(np.load(folder / "masks/ct_seg_liver.npy"))
    boxes = set()
    for epoch in range(24):
        dataset.set_epoch(epoch)
        for index in (liver_rec, liver_reg):
            ex = dataset.example(index)
            assert ex.box == mask_to_box(ex.mask)  # the text's box is the augmented mask's box
            text = f"<bx_start>{list(ex.box)}<bx_end>"
            assert text in (ex.answer if ex.task == "rec" else ex.question)
            # image and mask moved together: the bright voxels are exactly the mask's
            lo, hi = ex.image.min(), ex.image.max()
            np.testing.assert_array_equal((ex.image > (lo + hi) / 2).numpy(), ex.mask.numpy())
            assert int(ex.mask.sum()) == int(np.load(folder / "masks/ct_seg_liver.npy").sum())
            boxes.add(ex.box)
    assert original in boxes and len(boxes) >= 4  # the augmentation did move the box, and sometimes not


def test_a_box_without_mask_is_transformed_exactly(folder, tokenizer):
    dataset = M3DDataset(folder, tokenizer, N_IMAGE, seed=1)
    roi_rec = index_of(dataset, "rec", lambda r: r["label"] is None and r["box"])
    boxes = set()
    for epoch in range(24):
        dataset.set_epoch(epoch)
        ex = dataset.example(roi_rec)
        region = ex.mask[0].numpy()
        d, h, w = (np.flatnonzero(region.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
        assert region.sum() == len(d) * len(h) * len(w) == 7 * 17 * 17  # still the same solid box of voxels
        assert ex.box == mask_to_box(region)
        assert ex.answer == f"Coordinates are <bx_start>{list(ex.box)}<bx_end>."
        boxes.add(ex.box)
    assert (0.125, 0.25, 0.5, 0.5, 0.5, 0.75) in boxes and len(boxes) >= 3


def test_labels_are_ignored_exactly_on_prompt_and_padding(folder, tokenizer):
    dataset = M3DDataset(folder, tokenizer, N_IMAGE, seed=0)
    special = tokenizer.m3d_special_tokens
    items = [dataset[i] for i in range(len(dataset))]
    batch = dataset.collate(items)
    length = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == (len(items), length) and batch["images"].shape == (len(items), 1, *SHAPE)
    for i, item in enumerate(items):
        dataset.set_epoch(0)
        ex = dataset.example(i)
        prompt = encode_prompt(tokenizer, ex.question, N_IMAGE)
        n = len(item["input_ids"])
        labels, ids, attention = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        assert ids[: len(prompt)].tolist() == prompt
        assert (labels[: len(prompt)] == IGNORE_INDEX).all()  # BOS, image tokens, question
        assert (labels[len(prompt): n] == ids[len(prompt): n]).all() and (labels[len(prompt): n] >= 0).all()
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == special.pad).all()  # padding
        assert attention[:n].all() and not attention[n:].any()
        assert ids[n - 1] == special.eos  # the answer ends with EOS, which is supervised
        answer = tokenizer.decode(ids[len(prompt): n - 1].tolist(), skip_special_tokens=False)
        assert answer.replace(" ", "") == ex.answer.replace(" ", ""), (answer, ex.answer)
    assert set(batch["task"]) == {"report", "vqa_open", "vqa_closed", "rec", "reg", "seg", "refseg"}


def test_answers_follow_the_official_templates(folder, tokenizer):
    dataset = M3DDataset(folder, tokenizer, N_IMAGE, augment=False)
    texts = {(t, r.get("target")): dataset.example(i) for i, (t, r) in enumerate(dataset.samples)}
    assert texts[("report", None)].question == "Please generate a medical report based on this image."
    assert texts[("report", None)].answer == "The liver is normal. No focal lesion."
    closed = texts[("vqa_closed", None)]
    assert closed.question == " Which organ is enlarged? Choices: A. Spleen B. Pancreas C. Liver D. Kidney"
    assert closed.answer == "C. Liver"
    assert texts[("vqa_open", None)].answer == "The liver."
    assert texts[("rec", "gallbladder")].answer == "Sorry, there is no gallbladder."
    assert texts[("seg", "gallbladder")].answer == "Sorry, there is no gallbladder."
    assert not texts[("seg", "gallbladder")].segs.any()
    liver_seg = texts[("seg", "liver")]
    assert liver_seg.question == " What is liver in this image? Please respond with segmentation mask."
    assert liver_seg.answer == "It is [SEG]."
    assert torch.equal(liver_seg.segs, torch.from_numpy(np.load(folder / "masks/ct_seg_liver.npy")).float())
    assert texts[("reg", "spleen")].answer == "The target is spleen."
    assert texts[("reg", "spleen")].question == (
        " What target is present within the coordinates <bx_start>[0.125, 0.25, 0.5, 0.5, 0.5, 0.75]<bx_end> ?")
    refseg = texts[("refseg", "liver")]
    assert refseg.question == " Please segment the organ that produces bile."
    assert refseg.answer == "The target is liver and the segmentation mask is [SEG]." and refseg.segs.any()
    for ex in texts.values():
        if ex.task in ("rec", "reg"):
            assert not ex.segs.any()  # as the official datasets: no mask loss for boxes


def test_laterality_samples_are_never_flipped_or_rotated(folder, tokenizer):
    assert states_laterality("Where is kidney_left?") and states_laterality("The RIGHT lobe.")
    assert not states_laterality("a bright lesion", None, "the liver") and not states_laterality("leftover")
    dataset = M3DDataset(folder, tokenizer, N_IMAGE, seed=0)
    kidney = index_of(dataset, "rec", lambda r: r["target"] == "left kidney")
    original_mask = torch.from_numpy(np.load(folder / "masks/ct_seg_left_kidney.npy"))
    original_image = torch.from_numpy(np.load(folder / "images/ct_seg.npy"))
    intensity_changes = 0
    for epoch in range(16):
        dataset.set_epoch(epoch)
        ex = dataset.example(kidney)
        assert not ex.spatial_augment
        assert torch.equal(ex.mask, original_mask)
        # only intensity transforms: the image is a * original + b
        a, b = np.polyfit(original_image.flatten().numpy(), ex.image.flatten().numpy(), 1)
        np.testing.assert_allclose(ex.image.numpy(), a * original_image.numpy() + b, atol=1e-5)
        intensity_changes += not torch.equal(ex.image, original_image)
    assert intensity_changes > 5

    flipping = M3DDataset(folder, tokenizer, N_IMAGE, seed=0, flip_laterality=True)
    moved = 0
    for epoch in range(16):
        flipping.set_epoch(epoch)
        ex = flipping.example(kidney)
        assert ex.spatial_augment and ex.box == mask_to_box(ex.mask)
        moved += not torch.equal(ex.mask, original_mask)
    assert moved > 3


def test_items_are_reproducible_per_seed_epoch_and_index(folder, tokenizer):
    a = M3DDataset(folder, tokenizer, N_IMAGE, seed=3)
    b = M3DDataset(folder, tokenizer, N_IMAGE, seed=3)
    c = M3DDataset(folder, tokenizer, N_IMAGE, seed=4)
    index = index_of(a, "seg", lambda r: r["label"])
    same = [torch.equal(a[index]["images"], b[index]["images"]) for _ in range(2)]
    assert all(same)
    differs = []
    for epoch in range(5):
        a.set_epoch(epoch)
        c.set_epoch(epoch)
        differs.append(not torch.equal(a[index]["images"], c[index]["images"]))
    assert any(differs)
    a.set_epoch(0)
    first = a[index]["images"]
    a.set_epoch(1)
    assert not torch.equal(first, a[index]["images"])


def test_validation_is_not_augmented_and_tasks_filter(folder, tokenizer):
    dataset = M3DDataset(folder, tokenizer, N_IMAGE, split="validation")
    assert len(dataset) == 1 and dataset.task_counts == {"rec": 1}
    item = dataset[0]
    np.testing.assert_array_equal(item["images"].numpy(), np.load(folder / "images/ct_seg.npy"))
    only = M3DDataset(folder, tokenizer, N_IMAGE, tasks=["seg", "refseg"])
    assert only.task_counts == {"seg": 2, "refseg": 1}
    with pytest.raises(InputError, match="unknown task"):
        M3DDataset(folder, tokenizer, N_IMAGE, tasks=["caption"])
    with pytest.raises(InputError, match="no test samples"):
        M3DDataset(folder, tokenizer, N_IMAGE, split="test")
    with pytest.raises(InputError, match="no dataset.json"):
        M3DDataset(folder / "images", tokenizer, N_IMAGE)


def test_length_limits_cut_answers_and_refuse_prompts_without_room(tmp_path, tokenizer):
    folder = write_dataset(tmp_path / "long", report=" ".join(["The liver is normal."] * 200))
    dataset = M3DDataset(folder, tokenizer, N_IMAGE, tasks=["report"], max_length=64)
    assert dataset.truncated == 1
    item = dataset[0]
    assert len(item["input_ids"]) == 64 and item["input_ids"][-1] != tokenizer.m3d_special_tokens.eos
    assert (item["labels"][-10:] >= 0).all()
    with pytest.raises(InputError, match="no room for the answer"):
        M3DDataset(folder, tokenizer, N_IMAGE, tasks=["vqa_closed"], max_length=20)


def test_collate_pads_to_the_longest_item():
    items = [{"images": torch.zeros(1, 2, 2, 2), "segs": torch.zeros(1, 2, 2, 2), "task": t,
              "input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1), "attention_mask": torch.ones(n)}
             for t, n in (("seg", 3), ("rec", 5))]
    batch = collate(items, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 9], [1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[1, 2, 3, -100, -100], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["task"] == ["seg", "rec"] and batch["images"].shape == (2, 1, 2, 2, 2)
    with pytest.raises(InputError):
        collate([])
