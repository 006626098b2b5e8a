"""Held-out evaluation: greedy generation, scored with the recipe's rewards, with and without the right image.

The blind run gives every image row another row's images (a derangement, so no row keeps its own). A
policy that reads the image scores near chance there; one that guesses from the text does not drop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import BatchFeature
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.data import load_rows
from vlm_rl.models.adapters import FamilyAdapter, adapter_for
from vlm_rl.trainers.grpo import media_token_ids


def prompt_inputs(adapter: FamilyAdapter, processor, prompts: list, images: list[list]):
    """The padded model inputs of a batch of prompts, built the way the trainer builds them.

    Like TRL, one `apply_chat_template` call renders and tokenizes the conversations with their images: a
    second tokenization of rendered text would add BOS again (Gemma 3), and a flat image list would tile a
    multi-image row differently (LLaVA-OneVision). Text inputs are left-padded, then the family adapter moves
    any that must pad on the right (InstructBLIP's Q-Former text has absolute positions).
    """
    conversations = [prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, images, strict=True)]
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
            processor_kwargs={"padding": True, "return_tensors": "pt"},
        )  # fmt: skip
    finally:
        tokenizer.padding_side = padding_side
    return BatchFeature(adapter.repad_prompt_inputs(dict(inputs)))


def _generate(model, processor, prompts: list, images: list[list], max_new_tokens: int):
    """Greedy completions: their texts, and their token ids up to and including the first end-of-sequence."""
    adapter = adapter_for(model.config)
    adapter.check_images_per_row([len(row) for row in images])
    inputs = prompt_inputs(adapter, processor, prompts, images).to(model.device)
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


def deranged_rows(image_rows: Sequence[int], seed: int = 0) -> dict[int, int]:
    """For each image row, the other image row whose images it gets in a blind evaluation (none keeps its own)."""
    if len(image_rows) < 2:
        raise ValueError("A blind evaluation needs at least two rows with images.")
    order = list(image_rows)
    random.Random(seed).shuffle(order)
    return {row: order[(position + 1) % len(order)] for position, row in enumerate(order)}


def _batches(dataset: Dataset, batch_size: int) -> Iterator[list[tuple[int, dict]]]:
    """(index, row) pairs, one batch at a time: only a batch's images are decoded and held at once."""
    for start in range(0, len(dataset), batch_size):
        yield load_rows(dataset, list(range(start, min(start + batch_size, len(dataset)))))


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
    Rows load a batch at a time; a lazily loaded dataset's bad rows are left out under `bad_rows: skip`.
    """
    was_training = model.training
    model.eval()
    partners = None
    if blind:  # which rows have images: a first pass, so that no more than a batch of images is held
        image_rows = [index for batch in _batches(dataset, batch_size) for index, row in batch if row.get("images")]
        partners = deranged_rows(image_rows, seed)
    records = []
    for indexed in _batches(dataset, batch_size):
        batch = [row for _, row in indexed]
        if partners is None:
            images = [row.get("images") or [] for row in batch]
        else:
            lent = dict(load_rows(dataset, [partners[index] for index, _ in indexed if index in partners]))
            images = [list(lent[partners[index]]["images"]) if index in partners else [] for index, _ in indexed]
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
