"""What a GRPO run holds between optimizer steps besides weights, optimizer, scheduler and RNG.

With `steps_per_generation > 1` or `num_iterations > 1`, one generation feeds several optimizer steps from a buffer.
TRL keeps neither the buffer nor its place in the cycle in checkpoints, so a resumed run samples new completions
in the middle of a cycle and its steps no longer line up with the stopped run's. Each process saves its buffer,
its place, the metrics and reward-failure counts not yet logged, and dynamic sampling's count of prompts generated
for, next to HF's `rng_state_N.pth`; a resumed run then continues exactly where the stopped one was.

The loss summed since the last logging step, and that step, which HF's trainer drops on resume, are saved here too
(`logging_window`).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from vlm_rl.rewards.configured import ConfiguredReward
from vlm_rl.trainers.logging_window import logging_window, restore_logging_window

logger = logging.getLogger(__name__)

STATE_FILE = "rollout_state_{rank}.pt"


def _cycle(trainer) -> dict[str, int]:
    """What the buffer's meaning depends on: a resumed run with other values regenerates instead."""
    return {
        "steps_per_generation": trainer.args.steps_per_generation,
        "num_iterations": trainer.num_iterations,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "num_processes": trainer.accelerator.num_processes,
    }


def save_rollout_state(trainer, checkpoint: Path) -> None:
    """Write this process's state into `checkpoint` (each process its own file)."""
    state: dict[str, Any] = {
        "cycle": _cycle(trainer),
        "step": trainer._step,
        "buffered_inputs": trainer._buffered_inputs,
        "metrics": {mode: dict(values) for mode, values in trainer._metrics.items()},
        "reward_failures": trainer.reward_failures,
        "local_failures": {
            func.__name__: dict(func.failures) for func in trainer.reward_funcs if isinstance(func, ConfiguredReward)
        },
        "seen_routes": sorted(trainer._seen_routes),
        "prompts_consumed": trainer.dynamic_sampling.prompts_consumed if trainer.dynamic_sampling else 0,
        **logging_window(trainer),
    }
    torch.save(state, Path(checkpoint) / STATE_FILE.format(rank=trainer.accelerator.process_index))


def load_rollout_state(trainer, checkpoint: str | Path) -> bool:
    """Restore what `save_rollout_state` wrote, on every process or on none; whether it was restored."""
    path = Path(checkpoint) / STATE_FILE.format(rank=trainer.accelerator.process_index)
    device = trainer.accelerator.device
    location = "cpu" if device.type == "cpu" else device  # torch.load cannot map to "cpu:0", a CPU process's device
    state = torch.load(path, map_location=location, weights_only=True) if path.is_file() else None
    if state is not None and trainer.dynamic_sampling is not None:  # a running total, whatever the cycle
        trainer.dynamic_sampling.prompts_consumed = state.get("prompts_consumed", 0)
    usable = state is not None and state["cycle"] == _cycle(trainer)
    # Processes that disagreed would generate at different steps and wait for each other forever.
    usable_everywhere = trainer.accelerator.reduce(
        torch.tensor(float(usable), device=trainer.accelerator.device), reduction="min"
    ).item()
    if not usable_everywhere:
        if state is None:
            why = f"it has no {path.name} (saved by stock TRL or an older vlm-rl)"
        else:
            why = f"it was saved with {state['cycle']}, this run has {_cycle(trainer)}"
        logger.warning(
            "Resuming from %s without its buffered generations: %s. The generations of the current cycle are sampled "
            "anew, so the run continues as stock TRL would, not exactly as the stopped run would have.",
            checkpoint,
            why,
        )
        return False
    trainer._step = state["step"]
    trainer._buffered_inputs = state["buffered_inputs"]
    for mode, values in state["metrics"].items():
        trainer._metrics[mode] = defaultdict(list, values)
    trainer.reward_failures = state["reward_failures"]
    for func in trainer.reward_funcs:
        if isinstance(func, ConfiguredReward):
            func.failures = Counter(state["local_failures"].get(func.__name__, {}))
    trainer._seen_routes = set(state["seen_routes"])
    restore_logging_window(trainer, state)
    return True
