"""Held-out evaluation: greedy generation, scored with the recipe's rewards, with and without the right image.

The blind run gives every image row another row's images (a derangement, so no row keeps its own). A
policy that reads the image scores near chance there; one that guesses from the text does not drop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.trainers.grpo import media_token_ids


def _generate(model, processor, prompts: list, images: list[list], max_new_tokens: int):
    """Greedy completions: their texts, and their token ids up to and including the first end-of-sequence."""
    conversations = [prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, images, strict=True)]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    flat_images = [image for row in images for image in row]
    inputs = processor(
        text=texts, images=flat_images or None, padding=True, padding_side="left", return_tensors="pt"
    ).to(model.device)
    tokenizer = processor.tokenizer
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        suppress_tokens=media_token_ids(model.config),
        pad_token_id=tokenizer.pad_token_id,
    )
    generated = output[:, inputs["input_ids"].size(1) :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = [row[: next((i + 1 for i, token in enumerate(row) if token in eos), len(row))] for row in generated]
    return tokenizer.batch_decode(ids, skip_special_tokens=True), ids


def deranged_images(images: Sequence[list], seed: int = 0) -> list[list]:
    """Each image row gets the images of another image row; text-only rows keep none."""
    image_rows = [i for i, row in enumerate(images) if row]
    if len(image_rows) < 2:
        raise ValueError("A blind evaluation needs at least two rows with images.")
    order = image_rows[:]
    random.Random(seed).shuffle(order)
    swapped = [list(row) for row in images]
    for position, row in enumerate(order):
        swapped[row] = list(images[order[(position + 1) % len(order)]])
    return swapped


@torch.no_grad()
def evaluate_policy(
    model,
    processor,
    dataset: Dataset,
    reward_funcs: list[Callable],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    blind: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Generate greedily for every row and score each completion with every reward.

    Returns one record per row: the completion, whether the row has images, and `rewards` by function name.
    """
    was_training = model.training
    model.eval()
    rows = list(dataset)  # iterating decodes image features; `Dataset.to_list()` would not
    all_images = [row.get("images") or [] for row in rows]
    if blind:
        all_images = deranged_images(all_images, seed)
    records = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        images = all_images[start : start + batch_size]
        prompts = [row["prompt"] for row in batch]
        texts, completion_ids = _generate(model, processor, prompts, images, max_new_tokens)
        completions = [[{"role": "assistant", "content": text}] for text in texts]
        # Same calling convention as in training: every dataset column, as lists over the batch.
        columns = {key: [row[key] for row in batch] for key in batch[0] if key != "prompt"}
        columns["images"] = images
        columns["completion_ids"] = completion_ids
        scores = {func.__name__: func(prompts=prompts, completions=completions, **columns) for func in reward_funcs}
        for i, text in enumerate(texts):
            records.append(
                {
                    "completion": text,
                    "has_images": bool(images[i]),
                    "rewards": {name: values[i] for name, values in scores.items()},
                }
            )
    model.train(was_training)
    return records


def mean_reward(records: list[dict[str, Any]], name: str, *, has_images: bool | None = None) -> float | None:
    """Mean of reward `name` over the records (only those with/without images, if asked); None if empty."""
    values = [
        r["rewards"][name]
        for r in records
        if (has_images is None or r["has_images"] == has_images) and r["rewards"][name] is not None
    ]
    return sum(values) / len(values) if values else None
