"""The per-token log-prob forward's inputs and outputs where TRL 1.16's own assumptions do not hold for a VLM.

Which vision inputs each chunk of rows gets is `vlm_rl.models.inputs.select_rows`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from trl.trainer.utils import FusedCausalLMOutput

from vlm_rl.models.adapters import PER_TOKEN_KEYS


def align_per_token_inputs(inputs: dict[str, Any], width: int) -> dict[str, Any]:
    """Per-token inputs (left-padded like `input_ids`) cut to their last `width` columns.

    TRL 1.16 builds them with a second processor call on the rendered prompt text. A tokenizer that adds BOS
    itself (Gemma) adds one in front of the template's, so they get one more leading column than `prompt_ids`
    and, unless cut, mark the tokens one place to the right of the image tokens.
    """
    aligned = dict(inputs)
    for key in PER_TOKEN_KEYS:
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.size(1) > width:
            if value[:, : value.size(1) - width].any():
                raise ValueError(f"{key!r} is {value.size(1)} tokens wide for {width} tokens of input_ids.")
            aligned[key] = value[:, -width:]
    return aligned


def score_from_logits(model, temperature: float) -> None:
    """Make `model(..., labels=..., fused_lm_head=True)` work for a model without a separate backbone.

    TRL 1.16 patches every policy with a fused LM head that runs `model.base_model` for hidden states
    (`last_hidden_state`) and projects them itself. BLIP-2 and InstructBLIP have no such backbone (`base_model` is
    the model itself, which returns logits: "object has no attribute 'last_hidden_state'"), so for them the
    per-token log-probs and entropies are computed from the model's own logits, in the same layout.
    """
    fused_forward = model.forward

    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return fused_forward(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        labels = labels[:, 1:]
        mask = labels != -100
        # Only positions from the first scored one (the completions) go through the vocabulary-wide softmax.
        start = int(mask.any(dim=0).int().argmax()) if mask.any() else mask.size(1)
        logits = fused_forward(*args, **kwargs).logits[:, start:-1].float() / temperature
        logps = logits.log_softmax(dim=-1)
        log_probs = logps.gather(-1, labels[:, start:].clamp(min=0)[..., None])[..., 0]
        entropy = -(logps.exp() * logps).sum(dim=-1)
        log_probs = nn.functional.pad(log_probs, (start, 0)).masked_fill(~mask, 0)
        entropy = nn.functional.pad(entropy, (start, 0)).masked_fill(~mask, 0)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask)

    model.forward = forward
