"""Logging overrides of `VLMGRPOTrainer`: phase timings, per-reward and per-task breakdowns, completion tables.

A mixin placed before `GRPOTrainer` in the trainer's bases; each method overrides a TRL (or HF `Trainer`) method
named in `tests/test_trl_contract.py`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from accelerate.utils import gather_object
from transformers import is_trackio_available, is_wandb_available
from transformers.utils import is_rich_available
from trl.trainer.utils import print_prompt_completions_sample

from vlm_rl.models.inputs import conversation_text
from vlm_rl.rewards.configured import FAILURE_KINDS, ConfiguredReward
from vlm_rl.trainers.completion_logs import completion_text, write_completion_logs


class MetricsMixin:
    """What a training step adds to TRL's logs. Reads the trainer's `options`.

    Its state is created at first use, so that a trainer built without `__init__` logs too (see `VLMGRPOTrainer`).
    """

    # The optimizer step whose completion table was last written: the end-of-training summary is a log call too.
    _completions_logged_at: int | None = None

    @functools.cached_property
    def _phase_seconds(self) -> defaultdict[str, float]:
        """Seconds spent this optimizer step in generation and in the rewards (`timing/*` in the logs)."""
        return defaultdict(float)

    @functools.cached_property
    def reward_failures(self) -> dict[str, dict[str, int]]:
        """Failed samples so far per reward and kind (error, timeout, nonfinite), summed over processes."""
        return {}

    @functools.cached_property
    def _seen_routes(self) -> set[str]:
        """Every task (`reward_route_column` value) seen so far: each is logged at every step from then on."""
        return set()

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.model.training:  # an in-loop evaluation's rollouts are not part of a training step
                self._phase_seconds[phase] += time.perf_counter() - start

    def training_step(self, model, inputs, num_items_in_batch):
        start = time.perf_counter()
        output = super().training_step(model, inputs, num_items_in_batch)
        self._phase_seconds["step"] += time.perf_counter() - start
        if self._step % self.current_gradient_accumulation_steps == 0:  # TRL's step counter, just advanced
            seconds, self._phase_seconds = self._phase_seconds, defaultdict(float)
            metrics = self._metrics["train"]
            metrics["timing/rollout_s"].append(seconds["rollout"])
            metrics["timing/scoring_s"].append(seconds["scoring"])
            metrics["timing/update_s"].append(seconds["step"] - seconds["rollout"] - seconds["scoring"])
        return output

    def _generate(self, prompts: list):
        with self._timed("rollout"):
            return super()._generate(prompts)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with self._timed("scoring"):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._log_reward_breakdown(inputs, rewards_per_func)
        return rewards_per_func

    def _log_reward_breakdown(self, inputs: list[dict], rewards_per_func: torch.Tensor) -> None:
        """Per reward: how many samples it scored, and mean/std/count per task; failure totals for `log`."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        all_rewards = rewards_per_func.cpu()  # TRL's `_calculate_rewards` returns them gathered over processes
        route_column = self.options.reward_route_column
        routes = gather_object([row.get(route_column) for row in inputs])
        # A task absent from this batch counts 0, so each count averages over the same steps.
        self._seen_routes.update(str(r) for r in routes if r is not None)
        # `accuracy` / `eval_accuracy`: the mean of the reward the recipe reports as accuracy, under a plain name.
        accuracy_reward = self.options.eval_accuracy_reward
        if accuracy_reward in self.reward_func_names:
            values = all_rewards[:, self.reward_func_names.index(accuracy_reward)]
            metrics["accuracy"].append(torch.nanmean(values).item())
        for i, name in enumerate(self.reward_func_names):
            scored = ~torch.isnan(all_rewards[:, i])
            metrics[f"rewards/{name}/count"].append(scored.sum().item())
            for route in sorted(self._seen_routes):
                in_route = torch.tensor([r is not None and str(r) == route for r in routes])
                values = all_rewards[in_route & scored, i]
                metrics[f"rewards/{name}/{route}/count"].append(float(values.numel()))
                if values.numel():
                    metrics[f"rewards/{name}/{route}/mean"].append(values.mean().item())
                    metrics[f"rewards/{name}/{route}/std"].append(values.std(unbiased=False).item())
        for func in self.reward_funcs:
            if isinstance(func, ConfiguredReward):
                local = torch.tensor([func.failures[kind] for kind in FAILURE_KINDS], device=self.accelerator.device)
                totals = self.accelerator.reduce(local, reduction="sum").tolist()
                self.reward_failures[func.__name__] = dict(zip(FAILURE_KINDS, map(int, totals), strict=True))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            # Running totals, not averages: a failure shows up in every later log line.
            for name, counts in self.reward_failures.items():
                logs[f"rewards/{name}/failures"] = sum(counts.values())
                logs.update({f"rewards/{name}/failures_{kind}": n for kind, n in counts.items() if n})
        # TRL's completion table crashes wandb on image prompts (see `completion_logs`): write ours instead.
        log_completions, self.log_completions = self.log_completions, False
        try:
            super().log(logs, start_time)
        finally:
            self.log_completions = log_completions
        # Once per step: the end-of-training summary line is a log call too.
        fresh = self._completions_logged_at != self.state.global_step
        if self.accelerator.is_main_process and self.log_completions and self.model.training and fresh:
            self._completions_logged_at = self.state.global_step
            self._log_completion_table()

    def _log_completion_table(self) -> None:
        if is_rich_available():
            print_prompt_completions_sample(
                [conversation_text(p) for p in self._logs["prompt"]],
                [completion_text(c) for c in self._logs["completion"]],
                self._logs["rewards"],
                self._logs["advantages"],
                self.state.global_step,
                self.num_completions_to_print,
                extra=dict(self._logs["extra"]),
            )
        report_to = self.args.report_to or []
        backends = []
        if "wandb" in report_to and is_wandb_available():
            import wandb

            if wandb.run is not None:
                backends.append(wandb)
        if "trackio" in report_to and is_trackio_available():
            import trackio

            backends.append(trackio)
        write_completion_logs(
            self._logs, self.state.global_step, self.args.output_dir, backends, unique_prompts=self.log_unique_prompts
        )
