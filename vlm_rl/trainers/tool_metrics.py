"""Tool calls in the training logs: `tools/<name>/calls`, `tools/<name>/errors`, `tools/turns_per_completion`.

A mixin placed before `GRPOTrainer` in the trainer's bases. TRL 1.16 logs only `tools/call_frequency` and
`tools/failure_frequency` over all tools; these counts say which tool the model calls and gets wrong, read from the
finished conversations, so that they also count what no tool saw (a call of an unknown tool, a call TRL could not
parse). The limit on tool turns is the toolbox's (`vlm_rl/tools/toolbox.py`); it learns here where a turn ends.
"""

from __future__ import annotations

import torch

from vlm_rl.tools import ERROR_PREFIX

# How a call the template's parser could not read shows in the text (the Qwen templates' marker: TRL's only
# vision-language templates that render tool calls).
TOOL_CALL_MARKER = "<tool_call>"


def is_error_reply(content) -> bool:
    """Whether a tool message reports a failure: the toolbox's `Error: ...`, or TRL's `{'error': ...}`."""
    return isinstance(content, str) and content.startswith((ERROR_PREFIX, "{'error'"))


class ToolMetricsMixin:
    """Counts each generation batch's tool calls, errors and turns into TRL's metrics (when the run has tools)."""

    def _generate_single_turn(self, *args, **kwargs):
        # TRL generates once per tool turn of its loop: a call after this one starts the rollout's next turn.
        for environment in getattr(self, "environments", None) or ():
            if hasattr(environment, "_end_turn"):
                environment._end_turn()
        return super()._generate_single_turn(*args, **kwargs)

    def _generate(self, prompts: list):
        output = super()._generate(prompts)
        if not getattr(self, "tools", None):
            return output
        completions = output[3]  # TRL returns (prompt_ids, completion_ids, tool_mask, completions, ...)
        names = sorted({tool.__name__ for tool in self.tools}) + ["unknown"]
        calls, errors = [0] * len(names), [0] * len(names)
        turns = malformed = 0
        for messages in completions:
            previous = None
            for message in messages if isinstance(messages, list) else ():
                role = message.get("role")
                if role == "tool":
                    index = names.index(message.get("name")) if message.get("name") in names[:-1] else -1
                    calls[index] += 1
                    errors[index] += is_error_reply(message.get("content"))
                    turns += previous != "tool"
                elif role == "assistant" and not message.get("tool_calls"):
                    malformed += TOOL_CALL_MARKER in str(message.get("content") or "")
                previous = role
        counts = torch.tensor([*calls, *errors, turns, malformed, len(completions)], device=self.accelerator.device)
        counts = self.accelerator.gather(counts).view(-1, counts.numel()).sum(0).tolist()
        metrics = self._metrics["train" if self.model.training else "eval"]
        for i, name in enumerate(names):
            metrics[f"tools/{name}/calls"].append(counts[i])
            metrics[f"tools/{name}/errors"].append(counts[len(names) + i])
        metrics["tools/malformed_calls"].append(counts[-2])
        metrics["tools/turns_per_completion"].append(counts[-3] / max(counts[-1], 1))
        return output
