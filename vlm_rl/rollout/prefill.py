"""`generate` with each distinct prompt prefilled once, for the rollouts that run on the policy itself (no vLLM).

TRL passes `generate` every prompt G times, so the prompt's tokens (and its images, through the vision tower) are
processed G times before the first completion token. A causal language model's cache for a prompt does not depend
on what follows it, so here each distinct prompt (same token ids, same images) but its last token is run once with
the cache on, the cache's rows are copied out to the G rows that share it, and `generate` continues from there with
the last prompt token: the same next-token distributions, at about 1/G of the prefill. Videos (Qwen-VL families) are
part of the prompt like images: rows with the same prompt ids but different clips are different prompts.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.models.inputs import BOOKKEEPING_KEYS, group_rows, select_rows
from vlm_rl.rollout.in_place_cache import append_in_place


@contextlib.contextmanager
def prompts_prefilled_once(
    model,
    base_model,
    adapter: FamilyAdapter,
    num_images: list[int],
    num_tiles: list[int] | None = None,
    num_videos: list[int] | None = None,
) -> Iterator[None]:
    """Inside, `model.generate(input_ids=..., attention_mask=..., <vision inputs>, ...)` prefills each distinct prompt
    of its batch once. `base_model` is `model` without wrappers (PEFT); `num_images` counts each row's images,
    `num_tiles` (for families whose vision inputs hold tiles) each row's tiles, and `num_videos` (where the batch
    has videos) each row's videos."""
    original = model.generate
    had_own = "generate" in vars(model)

    def generate(input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any):
        # Nothing to prefill before the last token; or a cache class of the user's choice (`cache_implementation`),
        # which `generate` builds itself and will not take alongside a filled one.
        # Beam search and several sequences per row: `generate` expands the rows but not a cache passed in.
        config = copy.copy(kwargs.get("generation_config") or base_model.generation_config)
        for key in ("cache_implementation", "num_beams", "num_return_sequences"):
            if key in kwargs:
                setattr(config, key, kwargs[key])
        expands = (config.num_beams or 1) > 1 or (config.num_return_sequences or 1) > 1
        if input_ids.size(1) < 2 or config.cache_implementation or expands:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        vision = {key: kwargs.pop(key) for key in list(kwargs) if key in (*adapter.image_keys, *adapter.video_keys)}
        per_token = {key: kwargs.pop(key) for key in list(kwargs) if key in adapter.row_keys}
        counts = {} if num_tiles is None else {"num_tiles": num_tiles}
        counts |= {} if num_videos is None else {"num_videos": num_videos}
        split = adapter.split_vision_inputs({**vision, **per_token, **counts}, num_images)
        keys = (*adapter.image_keys, *adapter.video_keys)
        groups = group_rows(input_ids, [split[key] for key in keys if isinstance(split.get(key), list)])
        firsts = [group[0] for group in groups]
        prefill = select_rows(adapter, split, num_images, firsts)
        for key in BOOKKEEPING_KEYS:
            prefill.pop(key, None)
        parameters = inspect.signature(base_model.forward).parameters
        if "position_ids" in parameters:
            # The positions `generate` gives the whole prompt (from the attention mask; M-RoPE for Qwen-VL, which
            # also keeps each row's offset on the model), not the forward's default column numbers: the cache must
            # hold what `generate` would have put there.
            model_kwargs = {"attention_mask": attention_mask[firsts], **prefill}
            positions = base_model._prepare_position_ids_for_generation(input_ids[firsts], model_kwargs)
            prefill["position_ids"] = positions[..., :-1]
        for key in adapter.row_keys:
            if key in prefill:
                prefill[key] = prefill[key][:, :-1]
        if "logits_to_keep" in parameters:
            prefill["logits_to_keep"] = 1  # the prefill's logits are not used; skip the vocabulary projection
        with torch.no_grad():
            cache = model(
                input_ids=input_ids[firsts, :-1], attention_mask=attention_mask[firsts, :-1], use_cache=True, **prefill
            ).past_key_values
        index = torch.empty(input_ids.size(0), dtype=torch.long)
        for position, group in enumerate(groups):
            index[group] = position
        index = index.to(input_ids.device)
        cache.batch_select_indices(index)
        append_in_place(cache)
        adapter.select_generation_rows(base_model, index)
        return original(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, **per_token, **kwargs
        )

    model.generate = generate
    try:
        yield
    finally:
        if had_own:
            model.generate = original
        else:
            del model.generate
