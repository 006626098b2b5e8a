"""T-GRPO (`temporal_grpo`, vlm_rl/trainers/temporal_grpo.py): each video prompt is also rolled out with its clip's
frames shuffled, and the correct completions of a prompt that does at least `temporal_margin` x as well in order get
`temporal_bonus` added to their accuracy reward before the advantages.

The reward here reads what it is shown: a row's `videos` clip in order (frame grey levels rising) scores the row's
`ordered_score`, shuffled its `shuffled_score`, so each prompt's p and p-tilde are set by the test's rows.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.video_utils import VideoMetadata

from vlm_rl.data.video import Clip, shuffled_frame_order

SHADES = (0, 80, 160, 240)  # frame k is one grey level: the order a clip is shown in can be read back
G = 4


def grey_clip() -> Clip:
    frames = np.stack([np.full((56, 56, 3), shade, np.uint8) for shade in SHADES])
    metadata = VideoMetadata(total_num_frames=len(SHADES), fps=2.0, width=56, height=56, duration=2.0,
                             video_backend="pyav", frames_indices=list(range(len(SHADES))))  # fmt: skip
    return Clip(frames, metadata)


def levels(clip) -> list[int]:
    return [round(float(frame.mean())) for frame in clip]


def in_order(completions, videos, ordered_score, shuffled_score, **kwargs) -> list[float]:
    """`ordered_score` for a row shown its clip in order (or no clip), `shuffled_score` for one shown it shuffled."""
    shown_in_order = [not clips or levels(clips[0]) == sorted(levels(clips[0])) for clips in videos]
    return [o if ok else s for ok, o, s in zip(shown_in_order, ordered_score, shuffled_score, strict=True)]


# Per prompt: its G rows' scores in order, and (for the first G // 2 rows, the shuffled rollouts) shuffled.
PROMPTS = {
    "beats its shuffled rollouts": ([1, 1, 1, 0], [0, 0, 0, 0]),  # p = 0.75 >= 0.8 x 0: bonus
    "below the margin": ([1, 1, 0, 0], [1, 1, 1, 1]),  # p = 0.5 < 0.8 x 1: none
    "level with its shuffled rollouts": ([1, 1, 1, 1], [1, 1, 1, 1]),  # p = 1 >= 0.8 x 1: bonus
    "text only": ([1, 1, 1, 0], [0, 0, 0, 0]),  # no video: untouched
}


def rows() -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": question}], "images": [],
         "videos": [] if question == "text only" else [grey_clip()], "answer": "x",
         "ordered_score": float(ordered[k]), "shuffled_score": float(shuffled[k])}
        for question, (ordered, shuffled) in PROMPTS.items()
        for k in range(G)
    ]  # fmt: skip


def trainer_for(model, processor, tmp_path, rewards=(in_order,), **overrides):
    from conftest import small_config
    from datasets import Dataset

    from vlm_rl.trainers import VLMGRPOTrainer

    settings = {"num_generations": G, "per_device_train_batch_size": G * len(PROMPTS), "video_max_pixels": 56 * 56,
                "max_completion_length": 3, "eval_accuracy_reward": "in_order"}  # fmt: skip
    frames = [Image.fromarray(frame) for frame in grey_clip()]  # a video as PIL frames, as the Python API takes it
    dataset = Dataset.from_list([row | {"videos": frames if row["videos"] else []} for row in rows()])
    args = small_config(tmp_path, **(settings | overrides))
    return VLMGRPOTrainer(model=model, reward_funcs=list(rewards), args=args, train_dataset=dataset,
                          processing_class=processor)  # fmt: skip


@pytest.fixture
def seen(monkeypatch) -> list[list[list[int]]]:
    """Per call of the Qwen2-VL video processor: each clip's frames, as their grey levels."""
    calls = []
    preprocess = Qwen2VLVideoProcessor.preprocess

    def recording(self, videos, **kwargs):
        calls.append([levels(clip) for clip in videos])
        return preprocess(self, videos, **kwargs)

    monkeypatch.setattr(Qwen2VLVideoProcessor, "preprocess", recording)
    return calls


def scored(trainer) -> tuple[dict, list[float]]:
    """The training batch of `rows()` (in training mode: shuffled rollouts are for training batches only)."""
    trainer.model.train()
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(rows())
    return batch, list(trainer._logs["rewards"]["in_order"])


def test_video_prompts_are_rolled_out_shuffled_and_the_bonus_goes_where_p_beats_the_margin(load_tiny, tmp_path, seen):
    model, processor = load_tiny("qwen2_vl")
    trainer = trainer_for(model, processor, tmp_path, temporal_grpo=True)
    batch, rewards = scored(trainer)

    ordered_call, shuffled_call = seen
    assert ordered_call == [list(SHADES)] * (3 * G)  # the batch's own generation sees every clip in order
    # The shuffled generation: the first G // 2 rows of each video prompt, its clip in the seeded order of its group.
    orders = [shuffled_frame_order(len(SHADES), f"0:0:{group}", 0) for group in range(3)]
    assert shuffled_call == [[SHADES[k] for k in order] for order in orders for _ in range(G // 2)]
    assert all(k != position for order in orders for position, k in enumerate(order))  # no frame in its place

    expected = [1.3, 1.3, 1.3, 0, 1, 1, 0, 0, 1.3, 1.3, 1.3, 1.3, 1, 1, 1, 0]
    assert rewards == pytest.approx(expected)
    # The bonus is in the rewards TRL's advantages come from: each group's reward minus its mean, over its std.
    grouped = torch.tensor(expected).view(-1, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + 1e-4)
    torch.testing.assert_close(batch["advantages"].cpu(), advantages.flatten(), atol=1e-5, rtol=0)
    # The shuffled completions are not part of the batch, the logs or the breakdowns.
    assert batch["prompt_ids"].size(0) == G * len(PROMPTS) and len(trainer._logs["completion"]) == G * len(PROMPTS)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if name.startswith("temporal/")}
    assert metrics == pytest.approx({"temporal/ordered_accuracy": (0.75 + 0.5 + 1) / 3,
                                     "temporal/shuffled_accuracy": 2 / 3, "temporal/bonus_rate": 2 / 3,
                                     "temporal/video_prompts": 3.0})  # fmt: skip
    assert trainer._metrics["train"]["accuracy"][-1] == pytest.approx(12 / 16)  # the accuracy logged has no bonus


def test_off_by_default_nothing_is_rolled_out_twice_and_on_the_ordered_completions_are_the_same(
    load_tiny, tmp_path, seen
):
    model, processor = load_tiny("qwen2_vl")
    off = trainer_for(model, processor, tmp_path / "off")
    assert off.temporal is None
    batch_off, rewards_off = scored(off)
    assert len(seen) == 1 and rewards_off == [row["ordered_score"] for row in rows()]
    assert not any(name.startswith("temporal/") for name in off._metrics["train"])

    on = trainer_for(model, processor, tmp_path / "on", temporal_grpo=True, temporal_shuffled_generations=G,
                     temporal_bonus=0.5, temporal_margin=0.0)  # fmt: skip
    batch_on, rewards_on = scored(on)
    assert len(seen[2]) == 3 * G  # every row of a video prompt shuffled
    # The shuffled rollouts come after the ordered generation: the same completions, only the rewards differ.
    assert torch.equal(batch_on["completion_ids"], batch_off["completion_ids"])
    bonus = [0.5 * (score > 0.5 and bool(row["videos"])) for row, score in zip(rows(), rewards_off, strict=True)]
    assert rewards_on == pytest.approx([r + b for r, b in zip(rewards_off, bonus, strict=True)])


def complement(completions, ordered_score, **kwargs) -> list[float]:
    """1 - `ordered_score`: with `in_order`, the same total for every row shown its clip in order."""
    return [1.0 - score for score in ordered_score]


@pytest.mark.parametrize("temporal", [False, True])
def test_dynamic_sampling_keeps_a_group_whose_spread_comes_from_the_bonus(load_tiny, tmp_path, temporal):
    model, processor = load_tiny("qwen2_vl")
    trainer = trainer_for(model, processor, tmp_path, (in_order, complement), temporal_grpo=temporal,
                          dynamic_sampling=True, max_resample_rounds=0)  # fmt: skip
    trainer.model.train()
    trainer._scored_generation_batch(rows())
    # Without the bonus every row's total is 1: no group varies. With it, the first prompt's totals are 1.3 and 1.
    kept = trainer._metrics["train"]["dynamic_sampling/kept_fraction"][-1]
    assert kept == (0.25 if temporal else 0.0)


def test_a_training_run_logs_the_temporal_metrics(load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    trainer = trainer_for(model, processor, tmp_path, temporal_grpo=True, max_steps=1)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["temporal/video_prompts"] == 3.0 and 0 <= logged["temporal/bonus_rate"] <= 1
    assert {"temporal/ordered_accuracy", "temporal/shuffled_accuracy"} <= set(logged)


def test_temporal_settings_are_checked_with_the_field_to_change(load_tiny, tmp_path):
    from conftest import small_config

    with pytest.raises(ValueError, match="temporal_grpo generates its shuffled rollouts with the policy's `generate`"):
        small_config(tmp_path, temporal_grpo=True, use_vllm=True)
    with pytest.raises(ValueError, match=r"temporal_shuffled_generations must be between 1 and num_generations \(2\)"):
        small_config(tmp_path, temporal_grpo=True, temporal_shuffled_generations=3)
    model, processor = load_tiny("qwen2_vl")
    with pytest.raises(ValueError, match="reward 'accuracy', which is not among the rewards \\['in_order'\\]: set"):
        trainer_for(model, processor, tmp_path, temporal_grpo=True, eval_accuracy_reward="accuracy")


# Records, per process and reward call, each row's clip as the grey levels of its frames (None: no video).
FRAME_RECORDER = """
import json
import os


def frame_levels(completions, videos=None, **kwargs):
    with open(os.path.join(os.path.dirname(__file__), f"frames-rank{os.environ['RANK']}.jsonl"), "a") as f:
        shown = [[round(float(frame.mean())) for frame in clips[0]] if clips else None
                 for clips in videos or [[]] * len(completions)]
        f.write(json.dumps(shown) + "\\n")
    return [float(len(completion[0]["content"])) for completion in completions]
"""


@pytest.mark.scale
def test_two_processes_one_with_video_rows_one_without_roll_out_alike_and_log_the_comparison(tmp_path):
    """Process 1 holds a video prompt and process 0 a text prompt at every step: process 0 generates and scores a
    padding row in step with process 1's shuffled rollout (TRL's reward gather would otherwise hang), and both log
    the same comparison."""
    import json

    from test_distributed import check_ran, check_trained, launch, trainer_state, write_recipe

    for k, shade in enumerate(SHADES):
        Image.new("RGB", (56, 56), (shade,) * 3).save(tmp_path / f"frame{k}.png")
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(6):  # unshuffled: process 0 gets prompt 2k (text), process 1 prompt 2k+1 (video)
            video = [f"frame{k}.png" for k in range(len(SHADES))] if i % 2 else []
            f.write(json.dumps({"question": f"Lighter or darker? ({i})", "answer": "lighter", "videos": video}) + "\n")
    (tmp_path / "recorder.py").write_text(FRAME_RECORDER)
    recipe = write_recipe(
        tmp_path, dataset=str(tmp_path / "train.jsonl"), train_size=None, eval_size=None, prompt_template="{question}",
        shuffle_dataset=False, reward_funcs=["accuracy", "recorder.py:frame_levels"], per_device_train_batch_size=2,
        final_eval=False, temporal_grpo=True, video_max_pixels=56 * 56, max_steps=2,
    )  # fmt: skip
    code, output = launch("cpu_ddp.yaml", recipe, timeout=240)
    check_ran(code, output)
    check_trained(tmp_path / "run", 2)
    calls = [[json.loads(line) for line in (tmp_path / f"frames-rank{rank}.jsonl").read_text().splitlines()]
             for rank in (0, 1)]  # fmt: skip
    assert calls[0] == [[None, None], [None]] * 2  # its text rows, then a padding row, at each step
    for ordered, shuffled in zip(calls[1][::2], calls[1][1::2], strict=True):
        assert ordered == [list(SHADES)] * 2 and len(shuffled) == 1  # one shuffled rollout (G // 2) of its prompt
        assert sorted(shuffled[0]) == list(SHADES) and all(a != b for a, b in zip(shuffled[0], SHADES, strict=True))
    logged = [entry for entry in trainer_state(tmp_path / "run")["log_history"] if "loss" in entry]
    assert [entry["temporal/video_prompts"] for entry in logged] == [1.0, 1.0]
