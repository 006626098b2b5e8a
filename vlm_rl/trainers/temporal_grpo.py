"""T-GRPO (Video-R1, arXiv 2503.21776): a reward bonus for a group that does better with its clip's frames in order.

With `temporal_grpo` on, each training generation batch's video prompts are also rolled out with their clip's frames
shuffled (`shuffled_frame_order`: a seeded derangement per prompt and step), `temporal_shuffled_generations` times
each, with the same sampling settings and the same reward functions. Per prompt, p is the share of its ordered
completions that are correct (accuracy reward above `temporal_accuracy_threshold`) and p̃ that of its shuffled ones;
where p ≥ `temporal_margin` · p̃ (Video-R1's μ, 0.8), each correct ordered completion gets `temporal_bonus` (α, 0.3)
added to its accuracy reward, before TRL computes advantages. The shuffled completions are then dropped: they are
never trained on, logged or kept. Rows without a video are untouched.

Processes. TRL spreads a generation batch over processes in contiguous slices and gathers the rewards of all of
them; the shuffled rollouts follow the same layout (a prompt's shuffled rollouts are the first
`temporal_shuffled_generations` rows of its group, wherever they live). Every process generates and scores as many
shuffled rows (padded with a repeated row whose result is dropped), so that TRL's reward gather, and ZeRO-3's weight
gathers inside `generate`, see every process alike; the shuffled accuracies are gathered with their prompts, and
every process applies the same bonus to the gathered rewards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from vlm_rl.data.video import Clip, shuffled_frame_order
from vlm_rl.trainers.video_rows import VIDEOS


@dataclass(frozen=True)
class ShuffledAccuracy:
    """A generation batch's shuffled rollouts, gathered from every process: each one's prompt (its group's index in
    the batch, -1 for a padding row) and accuracy reward (NaN where the reward did not score it)."""

    groups: torch.Tensor
    accuracy: torch.Tensor


@dataclass(frozen=True)
class TemporalRule:
    """When and how much bonus the ordered completions of a prompt get (see the module docstring)."""

    accuracy_index: int  # the accuracy reward's column in TRL's rewards
    bonus: float
    margin: float
    threshold: float
    num_generations: int

    def correct_share(self, accuracy: torch.Tensor) -> float:
        """The share of the scored completions whose accuracy is above the threshold (NaN: none scored)."""
        scored = accuracy[~torch.isnan(accuracy)]
        return (scored > self.threshold).float().mean().item() if scored.numel() else math.nan

    def apply(
        self, rewards_per_func: torch.Tensor, shuffled: ShuffledAccuracy
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """TRL's gathered rewards with the bonus added, and the step's `temporal/*` metrics (none without a video
        prompt). A prompt whose accuracy was not scored (a routed reward) gets no bonus and is not counted."""
        rewards = rewards_per_func.clone()
        accuracy = rewards_per_func[:, self.accuracy_index].float().cpu()
        shuffled_groups, shuffled_accuracy = shuffled.groups.cpu(), shuffled.accuracy.float().cpu()
        ordered, unordered, earned = [], [], []
        for group in sorted(set(shuffled_groups[shuffled_groups >= 0].tolist())):
            rows = slice(group * self.num_generations, (group + 1) * self.num_generations)
            p = self.correct_share(accuracy[rows])
            p_shuffled = self.correct_share(shuffled_accuracy[shuffled_groups == group])
            if math.isnan(p) or math.isnan(p_shuffled):
                continue
            ordered.append(p)
            unordered.append(p_shuffled)
            earned.append(p >= self.margin * p_shuffled)
            if earned[-1]:
                correct = (accuracy[rows] > self.threshold).to(rewards.device, rewards.dtype)
                rewards[rows, self.accuracy_index] += self.bonus * correct
        if not ordered:
            return rewards, {}
        return rewards, {
            "temporal/ordered_accuracy": sum(ordered) / len(ordered),
            "temporal/shuffled_accuracy": sum(unordered) / len(unordered),
            "temporal/bonus_rate": sum(earned) / len(earned),
            "temporal/video_prompts": float(len(ordered)),
        }


@contextlib.contextmanager
def _beside_the_batch(trainer) -> Iterator[None]:
    """Inside, the `log_extra` / `log_metric` callbacks TRL hands reward functions do nothing (the shuffled scores
    must not become rows of the completion table or samples of a logged metric), and the batch's prompt inputs that
    `_tokenize_prompts` keeps for the ordered rows' scoring are left as they are; the shuffled rows' own tokenization
    sets the video inputs their generation reads (prefill sharing counts each row's videos from them)."""
    kept = trainer._adapter_fields, trainer._video_fields
    trainer._video_fields = None
    trainer._log_completion_extra = trainer._log_metric = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del trainer._log_completion_extra, trainer._log_metric
        trainer._adapter_fields, trainer._video_fields = kept


def _with_clip(prompt: list[dict], clip: Clip) -> list[dict]:
    """`prompt` (its video block in place, as `prompts_with_videos` put it) showing `clip` instead."""
    return [
        {**message, "content": [{**part, "video": clip} if part.get("type") == "video" else part
                                for part in message["content"]]}
        if isinstance(message.get("content"), list) else message
        for message in prompt
    ]  # fmt: skip


@dataclass
class TemporalGRPO:
    """One trainer's T-GRPO: the rule, the shuffled rollouts per prompt, and the rollouts made this step (a seed)."""

    rule: TemporalRule
    per_prompt: int
    seed: int
    _made: tuple[int, int] = (-1, 0)  # (global step, shuffled rollouts made at it)

    def _key(self, step: int) -> str:
        """What seeds this rollout's frame orders, with each prompt's group: the step, and how many rollouts came
        before it at that step (dynamic sampling's extra rounds). The same on every process and in a resumed run."""
        made = self._made[1] if self._made[0] == step else 0
        self._made = (step, made + 1)
        return f"{step}:{made}"

    def shuffled_accuracy(self, trainer, inputs: list[dict], prompts: list) -> ShuffledAccuracy | None:
        """Generate and score this process's shuffled rollouts of its rows `inputs` (clips decoded, `prompts` with
        their images and video in place); None when no process has a video prompt. Every process calls it for every
        training generation batch: it gathers."""
        group_size = self.rule.num_generations
        first = trainer.accelerator.process_index * len(inputs)
        chosen = [
            index
            for index, row in enumerate(inputs)
            if (first + index) % group_size < self.per_prompt and row.get(VIDEOS) and len(row[VIDEOS][0]) >= 2
        ]
        device = trainer.accelerator.device
        most = int(trainer.accelerator.gather(torch.tensor([len(chosen)], device=device)).max())
        if most == 0:
            return None
        key = self._key(trainer.state.global_step)
        rows, shown = [], []
        for index in chosen:
            clip = inputs[index][VIDEOS][0]
            order = shuffled_frame_order(len(clip), f"{key}:{(first + index) // group_size}", self.seed)
            rows.append({**inputs[index], VIDEOS: [clip[order]]})
            shown.append(_with_clip(prompts[index], clip[order]))
        padding = most - len(chosen)  # rows whose results are dropped: every process generates and scores alike
        rows += [rows[0] if rows else inputs[0]] * padding
        shown += [shown[0] if shown else prompts[0]] * padding
        groups = [(first + index) // group_size for index in chosen] + [-1] * padding
        with _beside_the_batch(trainer):
            with trainer._timed("rollout"):
                prompt_ids, images, fields = trainer._tokenize_prompts(shown)
                completion_ids, _ = trainer._generate_single_turn(prompt_ids, images, fields, group_size)
            texts = trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
            conversational = is_conversational({"prompt": shown[0]})
            completions = [[{"role": "assistant", "content": text}] for text in texts] if conversational else texts
            with trainer._timed("scoring"):
                # TRL's reward call, not the trainer's: the shuffled scores stay out of the reward breakdowns.
                rewards = GRPOTrainer._calculate_rewards(trainer, rows, shown, completions, completion_ids)
        return ShuffledAccuracy(
            trainer.accelerator.gather(torch.tensor(groups, device=device)), rewards[:, self.rule.accuracy_index]
        )

    def with_bonus(self, trainer, inputs: list[dict], prompts: list, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """TRL's gathered rewards of the batch with the bonus added; the `temporal/*` metrics logged."""
        shuffled = self.shuffled_accuracy(trainer, inputs, prompts)
        if shuffled is None:
            return rewards_per_func
        rewards, metrics = self.rule.apply(rewards_per_func, shuffled)
        for name, value in metrics.items():
            trainer._metrics["train"][name].append(value)
        return rewards
