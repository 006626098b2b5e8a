"""The console (one line per log, with and without the bar) and `<output_dir>/metrics.jsonl`, on real tiny runs."""

import json
import re

import pytest
from conftest import small_config

from vlm_rl.data import make_shapes_dataset
from vlm_rl.rewards.accuracy import accuracy
from vlm_rl.trainers import VLMGRPOTrainer

NUMBER = r"-?[\d.]+(?:e[-+]\d+)?"
TRAIN_LINE = re.compile(
    rf"step (\d+)/3 \| reward {NUMBER} \| accuracy {NUMBER} \| kl {NUMBER} \| len {NUMBER} \| {NUMBER} s/step "
    r"\| ETA \d\d:\d\d"
)
EVAL_LINE = re.compile(
    rf"eval step (\d+)/3 \| reward {NUMBER} \| accuracy {NUMBER} \| kl {NUMBER} \| len {NUMBER} \| {NUMBER} s"
)
DONE_LINE = re.compile(rf"done step 3/3 \| \d\d:\d\d total \| loss {NUMBER}")


def trainer(model, processor, output_dir, **overrides) -> VLMGRPOTrainer:
    """A trainer with KL (`beta`) and in-loop evaluations (step 2 and the end), so that every kind of line shows."""
    settings = {"max_steps": 3, "beta": 0.04, "eval_strategy": "steps", "eval_steps": 2}
    return VLMGRPOTrainer(
        model=model,
        reward_funcs=[accuracy],
        args=small_config(output_dir, per_device_eval_batch_size=4, **{**settings, **overrides}),
        train_dataset=make_shapes_dataset(4),
        eval_dataset=make_shapes_dataset(2, "test"),
        processing_class=processor,
    )


def metrics_lines(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("disable_tqdm", [True, False], ids=["printer", "bar"])
def test_each_log_is_one_readable_line_and_a_metrics_jsonl_entry(load_tiny, tmp_path, capfd, disable_tqdm):
    model, processor = load_tiny("qwen2_vl")
    run = trainer(model, processor, tmp_path / "run", disable_tqdm=disable_tqdm)
    capfd.readouterr()
    run.train()
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"(eval |done )?step \d", line)]
    # Steps 1 and 2, the evaluation at 2, step 3, the evaluation at the end, the end of training.
    assert len(lines) == len(run.state.log_history) == 6, out
    assert [int(TRAIN_LINE.fullmatch(line)[1]) for line in (lines[0], lines[1], lines[3])] == [1, 2, 3], lines
    assert [int(EVAL_LINE.fullmatch(line)[1]) for line in (lines[2], lines[4])] == [2, 3], lines
    assert DONE_LINE.fullmatch(lines[5]), lines[5]
    assert "{'" not in out, "a raw log dict was printed"
    assert metrics_lines(tmp_path / "run") == run.state.log_history


def test_a_resumed_run_rewrites_metrics_jsonl_from_its_checkpoint(load_tiny, tmp_path):
    checkpointing = {"save_strategy": "steps", "save_steps": 2, "eval_strategy": "no"}
    model, processor = load_tiny("qwen2_vl")
    trainer(model, processor, tmp_path / "run", **checkpointing).train()
    assert [entry["step"] for entry in metrics_lines(tmp_path / "run")] == [1, 2, 3, 3]
    model, processor = load_tiny("qwen2_vl")
    resumed = trainer(model, processor, tmp_path / "run", **checkpointing)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    # The stopped run's step 3 and end were logged after checkpoint-2: the resumed run logs them again, once.
    assert [entry["step"] for entry in metrics_lines(tmp_path / "run")] == [1, 2, 3, 3]
    assert metrics_lines(tmp_path / "run") == resumed.state.log_history
