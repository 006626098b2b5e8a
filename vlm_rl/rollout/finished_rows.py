"""`generate` on the policy with finished rows left out of the decoding forwards.

`generate` decodes its whole batch until the last row ends: a row that has emitted EOS goes on through every layer,
and its next token is then replaced by padding. With completions of uneven length (reasoning RL: 16 to 1,000 tokens)
most of those forwards are spent on rows that have ended. Here each decoding forward runs only the rows still going:
the cache drops a row's keys and values once it has emitted EOS, and the forward's logits are put back in the batch
`generate` expects, with zeros for the ended rows (whose tokens `generate` replaces by padding). The rows still going
get the same logits, so `generate`'s sampling, logits processors and stopping criteria see what they would have.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from vlm_rl.models.adapters import FamilyAdapter
from vlm_rl.rollout.in_place_cache import InPlaceLayer

# Inputs of a decoding forward with the batch in their first dimension; `position_ids` has it second to last
# ([batch, tokens] or [3 or 4, batch, tokens] for M-RoPE). A forward with any other tensor input runs every row.
# Cache layers whose rows `batch_select_indices` selects (a quantized or offloaded layer keeps more than `keys`).
SELECTABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, InPlaceLayer)
BATCH_FIRST = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


class _Decoding:
    """The state of one `generate` call: which of its rows are still in the cache, and which have ended."""

    def __init__(self, base_model, adapter: FamilyAdapter, batch_size: int, prompt_length: int, eos: torch.Tensor):
        self.base_model, self.adapter, self.eos = base_model, adapter, eos
        self.batch_size, self.prompt_length = batch_size, prompt_length
        self.kept = torch.arange(batch_size)  # the batch rows the cache holds, in its order
        self.ended = torch.zeros(batch_size, dtype=torch.bool)
        self.selects: bool | None = None  # decided at the first decoding forward, kept for the whole call

    def applies(self, kwargs: dict[str, Any]) -> bool:
        """A decoding forward of this call's batch, on a dynamic cache, with inputs this knows how to select."""
        input_ids, cache = kwargs.get("input_ids"), kwargs.get("past_key_values")
        if input_ids is None or input_ids.shape != (self.batch_size, 1) or cache is None:
            return False  # the prefill, or a forward of other rows (`prompts_prefilled_once`'s)
        if self.selects is None:
            known = (*BATCH_FIRST, "position_ids", "cache_position", "past_key_values")
            self.selects = (
                type(cache) is DynamicCache
                and all(type(layer) in SELECTABLE_LAYERS for layer in cache.layers)
                and kwargs.get("inputs_embeds") is None
                and not any(isinstance(value, torch.Tensor) and key not in known for key, value in kwargs.items())
            )
        return self.selects

    def select(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Note the rows that have just ended, drop them from the cache and model state, and select the inputs of the
        rest (at least one row stays, so that every process runs the forward under ZeRO-3's `synced_gpus`)."""
        cache = kwargs["past_key_values"]
        if cache.get_seq_length() >= self.prompt_length:  # the input token was generated, not the prompt's last
            self.ended |= torch.isin(kwargs["input_ids"][:, 0].cpu(), self.eos)
        going = self.kept[~self.ended[self.kept]]
        going = going if len(going) else self.kept[-1:]
        if len(going) < len(self.kept):
            positions = torch.searchsorted(self.kept, going).to(kwargs["input_ids"].device)
            cache.batch_select_indices(positions)
            self.adapter.select_generation_rows(self.base_model, positions)
            self.kept = going
        if len(self.kept) == self.batch_size:
            return kwargs
        rows = self.kept.to(kwargs["input_ids"].device)
        selected = dict(kwargs)
        for key in BATCH_FIRST:
            if isinstance(kwargs.get(key), torch.Tensor):
                selected[key] = kwargs[key][rows]
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            selected["position_ids"] = kwargs["position_ids"].index_select(-2, rows)
        return selected

    def put_back(self, outputs):
        """The forward's logits in `generate`'s batch: the ended rows' are zeros (their tokens become padding)."""
        if len(self.kept) == self.batch_size:
            return outputs
        logits = outputs.logits
        full = logits.new_zeros((self.batch_size, *logits.shape[1:]))
        full[self.kept.to(logits.device)] = logits
        outputs.logits = full
        return outputs


def eos_token_ids(config) -> torch.Tensor | None:
    """The EOS ids `generate` stops rows on, from its generation config (None: rows never end one by one)."""
    eos = config.eos_token_id
    if eos is None:
        return None
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)


@contextlib.contextmanager
def finished_rows_left_out(model, base_model, adapter: FamilyAdapter) -> Iterator[None]:
    """Inside, `model.generate(input_ids=..., ...)` runs each decoding forward on the rows that have not emitted EOS.
    `base_model` is the transformers model whose forward `generate` calls (`model` without wrappers such as PEFT)."""
    original_generate, original_forward = model.generate, base_model.forward
    had_generate, had_forward = "generate" in vars(model), "forward" in vars(base_model)
    state: list[_Decoding] = []

    @functools.wraps(original_forward)  # `generate` checks its kwargs against the forward's signature
    def forward(*args: Any, **kwargs: Any):
        decoding = state[-1] if state and not args else None
        if decoding is None or not decoding.applies(kwargs):
            return original_forward(*args, **kwargs)
        return decoding.put_back(original_forward(**decoding.select(kwargs)))

    def generate(*args: Any, **kwargs: Any):
        config = copy.copy(kwargs.get("generation_config") or base_model.generation_config)
        if "eos_token_id" in kwargs:
            config.eos_token_id = kwargs["eos_token_id"]
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        eos = eos_token_ids(config)
        if input_ids is None or eos is None:
            return original_generate(*args, **kwargs)
        state.append(_Decoding(base_model, adapter, input_ids.size(0), input_ids.size(1), eos))
        try:
            return original_generate(*args, **kwargs)
        finally:
            state.pop()

    model.generate, base_model.forward = generate, forward
    try:
        yield
    finally:
        for owner, name, had, original in (
            (model, "generate", had_generate, original_generate),
            (base_model, "forward", had_forward, original_forward),
        ):
            if had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
