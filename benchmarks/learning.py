"""Learning benchmark: does SFT + GRPO make a model better at a multi-step visual task? Held-out, before and after.

    make bench-learning                                   # every task, counting over 3 seeds
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learning.py --task counting --seeds 1
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learning.py --algorithms   # GRPO, DAPO, ...

Per task (`vlm_rl.data.scenes`) and seed: a tiny random Qwen2-VL, `vlm-rl sft` on the task's biased-teacher
replies (`recipes/<task>_sft_cpu.yaml`), a held-out evaluation, `vlm-rl train` (GRPO, `recipes/<task>_grpo_cpu.yaml`)
from the SFT output, and the same evaluation again. Both runs are the CLI commands a user runs, in child processes.
Each evaluation scores the held-out rows greedily, sampled (at the GRPO recipe's temperature: 1, 0.7 for zoom;
`--samples` per row) and blind (greedy, images swapped between rows: a policy that reads the image drops to about
`chance` there). For grounding the scores
are mean IoU, and `hits_*` the fraction of boxes at IoU ≥ 0.5 (for the others: of right answers). Counting also
gets a per-answer confusion table (true count × answer given), where a collapse onto a few answers shows. The GRPO
runs evaluate on the held-out rows every `eval_steps` (sampled, as TRL evaluates), for one figure per task of
held-out accuracy against step.

`synthetic:zoom` (`--task zoom`; not in the default run, which it would lengthen by half an hour) trains with the
`zoom_in` tool (`recipes/zoom_cpu.yaml`), and again from an SFT on the same teacher's answers without calls and a
GRPO with the tools off, for the same budget: `no_tools`. Its entry adds `tool_calls_per_completion` (calls that
ran per held-out row, greedy) before and after GRPO, and the figure the training tool-call rate.

`synthetic:motion` (`--task motion`, `recipes/motion_sft_cpu.yaml` then `recipes/motion_cpu.yaml`) is a task on video:
4-frame clips whose answer (which way the shape moves) is in the order of the frames. Its control is not the blind
run but the same held-out clips with each clip's frames shuffled (`vlm-rl eval --ablate-frames`): a policy that
reads the order falls to about chance there. Its entry has `shuffled_frames_sft` and `shuffled_frames_grpo` in place
of `blind_*`.

`--algorithms` trains GRPO, DAPO (clip-higher, dynamic sampling, token-level loss), Dr. GRPO and GSPO from one
counting SFT start for the same wall time each, and reports final held-out accuracy and the completions generated.

Writes `results.json`, `results.md` (the tables) and `learning_<task>.png` under `--output_dir`. The last line
of output is one JSON object: `{task: {sft, grpo, sft_sampled, grpo_sampled, blind_sft, blind_grpo, chance,
sft_minutes, grpo_minutes, total_minutes, ...}}` (`total_minutes`: SFT, GRPO and every evaluation), each score the
mean over seeds, with `*_spread` (max - min) where several ran.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import concatenate_datasets  # noqa: E402

from vlm_rl.checkpoints import latest_checkpoint  # noqa: E402
from vlm_rl.config import parse_recipe  # noqa: E402
from vlm_rl.evaluation import evaluate_policy, mean_reward  # noqa: E402
from vlm_rl.models import load_model_and_processor  # noqa: E402
from vlm_rl.prepare import prepare_data, prepare_rewards  # noqa: E402
from vlm_rl.tools import recipe_toolbox, resolve_tool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
SCORES = ("sft", "grpo", "sft_sampled", "grpo_sampled", "blind_sft", "blind_grpo")


@dataclass(frozen=True)
class Task:
    seeds: int  # how many seeds the full benchmark runs
    score: str  # what its accuracy reward measures, for the tables and figures
    grpo_recipe: str = "{name}_grpo_cpu.yaml"
    # A task with tools also runs SFT (on this split) + GRPO with the tools off, for the same budget: `no_tools`.
    no_tools_split: str | None = None
    in_default_run: bool = True  # zoom: only with `--task zoom` (about 30 minutes of its own)
    # The control evaluation: `blind` (images swapped between rows) or `shuffled_frames` (each clip's frames shuffled,
    # for a task on video whose answer is in the order of the frames).
    control: str = "blind"


TASKS = {
    "counting": Task(seeds=3, score="accuracy"),
    "grounding": Task(seeds=1, score="mean IoU"),
    "count_diff": Task(seeds=1, score="accuracy"),
    "zoom": Task(
        seeds=1, score="accuracy", grpo_recipe="zoom_cpu.yaml", no_tools_split="sft_no_tools", in_default_run=False
    ),
    "motion": Task(seeds=1, score="accuracy", grpo_recipe="motion_cpu.yaml", control="shuffled_frames"),
}
# Extra `vlm-rl train` flags per algorithm, on top of the counting GRPO recipe (TRL's names for each).
ALGORITHMS = {
    "GRPO": ["--loss_type", "grpo", "--scale_rewards", "group"],
    "DAPO": ["--loss_type", "dapo", "--epsilon_high", "0.28", "--dynamic_sampling", "true"],
    "Dr. GRPO": ["--loss_type", "dr_grpo", "--scale_rewards", "none"],
    "GSPO": ["--importance_sampling_level", "sequence", "--loss_type", "grpo", "--epsilon", "3e-4",
             "--epsilon_high", "4e-4"],
}  # fmt: skip

# `--smoke`: a few steps of each stage on a few rows, to check the pipeline end to end (tests/test_learning_bench.py).
SMOKE = ["--max_steps", "2", "--train_size", "16", "--eval_size", "8", "--eval_steps", "1", "--logging_steps", "1"]


def run_cli(
    command: str, recipe: Path, output_dir: Path, seed: int, *extra: str, minutes: float | None = None
) -> float:
    """Run `vlm-rl <command>` as a user would, its log in `output_dir/<command>.log`; return its minutes.

    With `minutes`, stop it after that long the way a cluster scheduler would (SIGTERM): it saves a checkpoint
    after the step it is in and exits (docs/reliability.md).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "vlm_rl.cli", command, "--config", str(recipe), "--output_dir", str(output_dir)]
    args += ["--seed", str(seed), "--disable_tqdm", "true", *extra]
    start = time.perf_counter()
    with open(output_dir / f"{command}.log", "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            process.wait(timeout=None if minutes is None else minutes * 60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            process.wait()
            if process.returncode == 128 + signal.SIGTERM:
                return (time.perf_counter() - start) / 60
    if process.returncode != 0:
        raise SystemExit(f"`{' '.join(args)}` failed; its log: {output_dir / f'{command}.log'}")
    return (time.perf_counter() - start) / 60


def evaluate(
    model_dir: Path, grpo_recipe: Path, samples: int, seed: int, overrides: list[str], control: str = "blind"
) -> dict:
    """Greedy, sampled and `control` (blind, or frames shuffled) held-out scores of the model in `model_dir`, on the
    GRPO recipe's held-out rows."""
    model_args, data_args, reward_args, training_args, _ = parse_recipe(["--config", str(grpo_recipe), *overrides])
    task = prepare_data(data_args, training_args, grpo_recipe.parent)
    rewards = prepare_rewards(reward_args, training_args, grpo_recipe.parent)
    name = training_args.eval_accuracy_reward
    model, processor = load_model_and_processor(str(model_dir), dtype=model_args.dtype)
    kwargs = {"max_new_tokens": training_args.max_completion_length, "batch_size": 50}
    tools = [resolve_tool(spec, grpo_recipe.parent) for spec in training_args.tools]
    kwargs["environment_factory"] = recipe_toolbox(
        tools, processor, model.config.model_type, training_args.max_tool_turns
    )
    kwargs["max_tool_turns"] = training_args.max_tool_calling_iterations
    greedy = evaluate_policy(model, processor, task.eval, rewards, **kwargs)
    if control == "blind":
        controlled = evaluate_policy(model, processor, task.eval, rewards, blind=True, **kwargs)
    else:
        controlled = evaluate_policy(model, processor, task.eval, rewards, shuffle_frames=True, seed=seed, **kwargs)
    torch.manual_seed(seed)
    repeated = concatenate_datasets([task.eval] * samples)
    sampled = evaluate_policy(model, processor, repeated, rewards, temperature=training_args.temperature, **kwargs)
    tokens = [len(processor.tokenizer(r["completion"]).input_ids) for r in sampled]
    has_format = "think_answer_format" in [func.__name__ for func in rewards]
    return {
        "greedy": mean_reward(greedy, name),
        "sampled": mean_reward(sampled, name),
        control: mean_reward(controlled, name, **{"has_images" if control == "blind" else "has_videos": True}),
        "chance": task.chance,
        "mean_completion_tokens": mean(tokens),
        "format": mean(r["rewards"]["think_answer_format"] for r in sampled) if has_format else None,
        "hits": mean(float((r["rewards"][name] or 0.0) >= 0.5) for r in greedy),
        "tool_calls": mean(r["tool_calls"] for r in greedy) if tools else None,
        "confusion": confusion(greedy),
    }


def confusion(records: list[dict]) -> dict[str, dict[str, int]]:
    """True answer → {answer given: rows}; the answer is what the `<answer>` block holds ("?" when there is none)."""
    table: dict[str, Counter] = {}
    for record in records:
        match = re.search(r"<answer>(.*?)</answer>", record["completion"], re.DOTALL)
        table.setdefault(str(record["answer"]), Counter())[match.group(1).strip() if match else "?"] += 1
    return {truth: dict(counts) for truth, counts in sorted(table.items())}


def curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out accuracy) from a GRPO run's in-loop evaluations."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], entry["eval_accuracy"]) for entry in history if "eval_accuracy" in entry]


def tool_call_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, tool turns per completion) from a GRPO run's training logs: the rate at which the policy calls."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e["tools/turns_per_completion"]) for e in history if "tools/turns_per_completion" in e]


def with_start(points: list[tuple[int, float]], start: float) -> list[tuple[int, float]]:
    """The learning curve from step 0: the SFT model's sampled score, where the run did not evaluate before step 1."""
    return points if points and points[0][0] == 0 else [(0, start), *points]


def sft_then_grpo(
    sft_recipe: Path,
    grpo_recipe: Path,
    run_dir: Path,
    samples: int,
    seed: int,
    overrides: list[str],
    *sft_flags: str,
    control: str = "blind",
) -> tuple[dict, dict, float, float]:
    """`vlm-rl sft`, evaluate, `vlm-rl train` from the SFT output, evaluate: (before, after, SFT and GRPO minutes)."""
    sft_minutes = run_cli("sft", sft_recipe, run_dir / "sft", seed, *sft_flags, *overrides)
    before = evaluate(run_dir / "sft", grpo_recipe, samples, seed, overrides, control)
    grpo_args = ["--model_name_or_path", str(run_dir / "sft"), *overrides]
    grpo_minutes = run_cli("train", grpo_recipe, run_dir / "grpo", seed, *grpo_args)
    after = evaluate(run_dir / "grpo", grpo_recipe, samples, seed, overrides, control)
    return before, after, sft_minutes, grpo_minutes


def without_tools(recipe: Path, run_dir: Path) -> Path:
    """The GRPO recipe with its tools off (its other settings as they are), written next to the run."""
    settings = yaml.safe_load(recipe.read_text())
    settings.pop("tools", None)
    settings.pop("max_tool_turns", None)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / recipe.name
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def run_seed(name: str, seed: int, output_dir: Path, samples: int, overrides: list[str]) -> dict:
    """SFT, evaluate, GRPO, evaluate: one task, one seed (and the same without the task's tools, if it has some)."""
    task = TASKS[name]
    sft_recipe, grpo_recipe = RECIPES / f"{name}_sft_cpu.yaml", RECIPES / task.grpo_recipe.format(name=name)
    run_dir = output_dir / f"{name}-seed{seed}"
    start = time.perf_counter()
    before, after, sft_minutes, grpo_minutes = sft_then_grpo(
        sft_recipe, grpo_recipe, run_dir, samples, seed, overrides, control=task.control
    )
    control = task.control
    result = {
        "seed": seed,
        "sft": before["greedy"],
        "grpo": after["greedy"],
        "sft_sampled": before["sampled"],
        "grpo_sampled": after["sampled"],
        f"{control}_sft": before[control],
        f"{control}_grpo": after[control],
        "chance": before["chance"],
        "sft_minutes": sft_minutes,
        "grpo_minutes": grpo_minutes,
        "total_minutes": (time.perf_counter() - start) / 60,  # SFT, GRPO and every evaluation
        "completion_tokens_grpo": after["mean_completion_tokens"],
        "format_grpo": after["format"],
        "hits_sft": before["hits"],
        "hits_grpo": after["hits"],
        "confusion_sft": before["confusion"],
        "confusion_grpo": after["confusion"],
        "curve": with_start(curve(run_dir / "grpo"), before["sampled"]),
    }
    if task.no_tools_split is not None:
        plain_dir = run_dir / "no_tools"
        plain = without_tools(grpo_recipe, plain_dir)
        _, plain_after, plain_sft, plain_grpo = sft_then_grpo(
            sft_recipe, plain, plain_dir, samples, seed, overrides, "--split", task.no_tools_split
        )
        result |= {
            "tool_calls_sft": before["tool_calls"],
            "tool_calls_per_completion": after["tool_calls"],
            "tool_calls_curve": tool_call_curve(run_dir / "grpo"),
            "no_tools": plain_after["greedy"],
            "no_tools_sampled": plain_after["sampled"],
            "blind_no_tools": plain_after["blind"],
            "no_tools_minutes": plain_sft + plain_grpo,
        }
    print(json.dumps({name: {k: v for k, v in result.items() if not k.startswith(("confusion", "curve"))}}))
    return result


def summarize(runs: list[dict]) -> dict:
    """Means over seeds, with the spread (max - min) of each score where several seeds ran."""
    keys = (*SCORES, "chance", "sft_minutes", "grpo_minutes", "completion_tokens_grpo", "format_grpo", "hits_sft")
    keys += ("hits_grpo", "tool_calls_sft", "tool_calls_per_completion", "no_tools", "no_tools_sampled")
    keys += ("blind_no_tools", "no_tools_minutes", "shuffled_frames_sft", "shuffled_frames_grpo", "total_minutes")
    summary = {key: mean(run[key] for run in runs) for key in keys if runs[0].get(key) is not None}
    if len(runs) > 1:
        scores = [key for key in SCORES if runs[0].get(key) is not None]
        summary |= {f"{key}_spread": max(r[key] for r in runs) - min(r[key] for r in runs) for key in scores}
    summary["seeds"] = len(runs)
    return summary


def plot(name: str, task: Task, runs: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(5, 3.2))
    for run in runs:
        steps, values = zip(*run["curve"], strict=True)
        axes.plot(steps, values, marker="o", markersize=3, label=f"seed {run['seed']}")
    if runs[0]["chance"] is not None:
        axes.axhline(runs[0]["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    if runs[0].get("tool_calls_curve"):  # the rate at which the policy calls its tool, on a second axis
        calls = axes.twinx()
        for run in runs:
            steps, values = zip(*run["tool_calls_curve"], strict=True)
            calls.plot(steps, values, color="tab:red", linewidth=1, alpha=0.7)
        calls.set_ylabel("tool turns per completion (training)", color="tab:red")
    axes.set(xlabel="GRPO step (0: after SFT)", ylabel=f"held-out {task.score} (sampled)", title=name)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def cell(summary: dict, key: str) -> str:
    """A score with ± half its spread over seeds, or – where the task has none (e.g. chance for grounding)."""
    value = summary.get(key)
    if value is None:
        return "–"
    spread = summary.get(f"{key}_spread")
    return f"{value:.2f}" + (f" ± {spread / 2:.2f}" if spread else "")


def markdown(results: dict[str, dict], runs: dict[str, list[dict]]) -> str:
    lines = [
        "| task | score | SFT greedy | GRPO greedy | SFT sampled | GRPO sampled | blind SFT | blind GRPO | chance "
        "| ≥ 0.5, SFT | ≥ 0.5, GRPO | SFT min | GRPO min | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in results.items():
        lines.append(
            f"| {name} | {TASKS[name].score} | "
            + " | ".join(cell(summary, k) for k in (*SCORES, "chance", "hits_sft", "hits_grpo"))
            + " | "
            f"{summary['sft_minutes']:.1f} | {summary['grpo_minutes']:.1f} | {summary['seeds']} |"
        )
    tooled = [name for name, summary in results.items() if "no_tools" in summary]
    if tooled:
        header = "| task | GRPO with its tool | GRPO without (same budget) | blind, with the tool "
        header += "| tool calls per completion, SFT → GRPO | minutes without |"
        lines += ["", header, "|---|---|---|---|---|---|"]
        for name in tooled:
            summary = results[name]
            calls = f"{summary['tool_calls_sft']:.2f} → {summary['tool_calls_per_completion']:.2f}"
            lines.append(
                f"| {name} | {cell(summary, 'grpo')} | {cell(summary, 'no_tools')} | {cell(summary, 'blind_grpo')} "
                f"| {calls} | {summary['no_tools_minutes']:.1f} |"
            )
    ordered = [name for name, summary in results.items() if "shuffled_frames_grpo" in summary]
    if ordered:
        lines += [
            "",
            "| task | GRPO greedy | frames shuffled, SFT | frames shuffled, GRPO | chance | minutes in all |",
        ]
        lines += ["|---|---|---|---|---|---|"]
        for name in ordered:
            summary = results[name]
            scores = " | ".join(cell(summary, k) for k in ("grpo", "shuffled_frames_sft", "shuffled_frames_grpo"))
            lines.append(f"| {name} | {scores} | {cell(summary, 'chance')} | {summary['total_minutes']:.1f} |")
    for name, task_runs in runs.items():
        if name != "counting":
            continue
        for run in task_runs:
            for stage in ("sft", "grpo"):
                table = run[f"confusion_{stage}"]
                answers = sorted({a for row in table.values() for a in row}, key=lambda a: (not a.isdigit(), a))
                lines += ["", f"Counting, seed {run['seed']}, after {stage.upper()}: true count × answer (greedy)", ""]
                lines += ["| true \\ answer | " + " | ".join(answers) + " |", "|---" * (len(answers) + 1) + "|"]
                lines += [
                    f"| {t} | " + " | ".join(str(row.get(a, 0)) for a in answers) + " |" for t, row in table.items()
                ]
    return "\n".join(lines) + "\n"


def compare_algorithms(
    output_dir: Path, algorithms: dict[str, list[str]], minutes: float, samples: int, seed: int, overrides: list[str]
) -> dict:
    """Each algorithm from the same counting SFT start, for `minutes` of training each."""
    grpo_recipe = RECIPES / "counting_grpo_cpu.yaml"
    start = output_dir / "algorithms" / "sft"
    if not (start / "config.json").is_file():
        run_cli("sft", RECIPES / "counting_sft_cpu.yaml", start, seed, *overrides)
    before = evaluate(start, grpo_recipe, samples, seed, overrides)
    results = {"SFT start": {"greedy": before["greedy"], "sampled": before["sampled"]}}
    for name, flags in algorithms.items():
        run_dir = output_dir / "algorithms" / re.sub(r"\W+", "_", name).strip("_").lower()
        extra = ["--model_name_or_path", str(start), "--max_steps", "100000", "--save_steps", "100000"]
        extra += ["--eval_strategy", "no", "--eval_on_start", "false", "--final_eval", "false"]
        run_minutes = run_cli("train", grpo_recipe, run_dir, seed, *extra, *flags, *overrides, minutes=minutes)
        trained = latest_checkpoint(run_dir) or run_dir
        after = evaluate(trained, grpo_recipe, samples, seed, overrides)
        state = json.loads((trained / "trainer_state.json").read_text())
        results[name] = {
            "greedy": after["greedy"],
            "sampled": after["sampled"],
            "blind": after["blind"],
            "steps": state["global_step"],
            "completions": completions_generated(state, grpo_recipe),
            "minutes": run_minutes,
        }
        print(json.dumps({name: results[name]}))
    return results


def completions_generated(state: dict, recipe: Path) -> int:
    """Completions a run generated: dynamic sampling's count of prompts × G where logged, else steps × batch."""
    _, _, _, args, _ = parse_recipe(["--config", str(recipe)])
    consumed = [
        e["dynamic_sampling/prompts_consumed"]
        for e in state["log_history"]
        if "dynamic_sampling/prompts_consumed" in e
    ]
    if consumed:
        return int(consumed[-1] * args.num_generations)
    return int(state["global_step"] * args.per_device_train_batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), action="append", help="Run only these tasks (repeatable).")
    parser.add_argument("--seeds", type=int, help="Seeds per task. Default: 3 for counting, 1 for the others.")
    parser.add_argument("--samples", type=int, default=4, help="Sampled completions per held-out row.")
    parser.add_argument("--output_dir", default="outputs/bench_learning")
    parser.add_argument("--algorithms", action="store_true", help="Compare GRPO, DAPO, Dr. GRPO, GSPO on counting.")
    parser.add_argument("--minutes", type=float, default=3.0, help="--algorithms: training minutes per algorithm.")
    parser.add_argument(
        "--algorithm", choices=list(ALGORITHMS), action="append", help="--algorithms: only these (repeatable)."
    )
    parser.add_argument("--smoke", action="store_true", help="A few steps of each stage: checks the pipeline only.")
    args = parser.parse_args()
    overrides = SMOKE if args.smoke else []
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.algorithms:
        algorithms = {name: ALGORITHMS[name] for name in args.algorithm or ALGORITHMS}
        results = compare_algorithms(output_dir, algorithms, args.minutes, args.samples, 0, overrides)
        (output_dir / "algorithms.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results))
        return
    results, runs = {}, {}
    for name in args.task or [name for name, task in TASKS.items() if task.in_default_run]:
        seeds = args.seeds or TASKS[name].seeds
        runs[name] = [run_seed(name, seed, output_dir, args.samples, overrides) for seed in range(seeds)]
        results[name] = summarize(runs[name])
        plot(name, TASKS[name], runs[name], output_dir / f"learning_{name}.png")
    (output_dir / "results.json").write_text(json.dumps({"summary": results, "runs": runs}, indent=2) + "\n")
    (output_dir / "results.md").write_text(markdown(results, runs))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
