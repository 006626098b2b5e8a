"""Soak: the CPU demo for 2,000 steps, once uninterrupted and once stopped by SIGTERM every 500 steps and resumed.

    make soak        (or: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py)

Both runs are the real `vlm-rl train` command in a subprocess. The interrupted run is relaunched with
`--resume_from_checkpoint auto` after each stop, as a requeued cluster job is. While each training process runs, its
resident memory, open file descriptors and threads are read from `/proc/<pid>` every `--interval` seconds. Checks:

- the logged values (`trainer_state.json`'s log history at every logged step, timings aside) of the two runs are
  equal, value for value;
- the final weights (`model.safetensors`) are equal, tensor for tensor;
- each training process's RSS grows by at most `--max_rss_growth` from warm-up (its first logged step at least
  `--warmup_steps` after the step it started from) to its last logged step before it stops;
- its open files and threads at that last step are no more than at warm-up.

The last line printed is one JSON object with the numbers and each check's result; the exit status is 1 if a check
failed. Runs are written to `--output_dir` (replaced on each run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# Logged per step but not part of what a run computes.
NOT_COMPARED = ("timing/", "step_time")
# The console line the trainer prints at each logging step (vlm_rl/trainers/progress.py).
STEP_LINE = re.compile(r"^step (\d+)/\d+ \|", re.MULTILINE)


@dataclass
class Sample:
    """One reading of a process from /proc: how much memory it holds, how many files and threads it has open."""

    seconds: float  # since the process started
    step: int  # the last step the console showed when read; 0 before the first
    rss_kb: int
    fds: int
    threads: int


def read_proc(pid: int, seconds: float = 0.0, step: int = 0) -> Sample:
    """Read `pid`'s resident memory and thread count from /proc/<pid>/status and count its open descriptors."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return Sample(
        seconds=round(seconds, 2),
        step=step,
        rss_kb=int(fields["VmRSS"].split()[0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(fields["Threads"]),
    )


@dataclass
class Segment:
    """One training process: the step it started from, the step it stopped after, and its /proc readings while it
    trained (from its first logged step until it finished training or was sent SIGTERM)."""

    start_step: int
    exit_code: int = 0
    end_step: int = 0
    minutes: float = 0.0
    samples: list[Sample] = field(default_factory=list)


def train_command(config: Path, output_dir: Path, steps: int, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "vlm_rl.cli", "train", "--config", str(config)]
    command += ["--max_steps", str(steps), "--output_dir", str(output_dir), "--disable_tqdm", "true"]
    return command + (["--resume_from_checkpoint", "auto"] if resume else [])


def run_segment(command: list[str], log: Path, start_step: int, stop_at: int | None, interval: float) -> Segment:
    """Run one training process, reading /proc every `interval` seconds while it trains; send it SIGTERM once the
    console shows step `stop_at` (None: let it finish)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    segment = Segment(start_step=start_step)
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    step, training, next_sample = 0, True, 0.0
    try:
        while process.poll() is None:
            text = log.read_text()
            steps = STEP_LINE.findall(text)
            step = int(steps[-1]) if steps else 0
            if "done step" in text:  # training ended: the final save and evaluation are not training
                training = False
            now = time.monotonic() - started
            if step and training and now >= next_sample:
                try:
                    segment.samples.append(read_proc(process.pid, now, step))
                except (FileNotFoundError, ProcessLookupError):  # it exited between poll() and the read
                    break
                next_sample = now + interval
            if training and stop_at is not None and step >= stop_at:
                process.send_signal(signal.SIGTERM)
                training = False
            time.sleep(0.1)
        segment.exit_code = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    segment.minutes = round((time.monotonic() - started) / 60, 2)
    return segment


def trained_to(log: Path) -> int:
    """The step a stopped run saved its checkpoint at, from its one-line message."""
    found = re.search(r"Stopped by SIGTERM after step (\d+); checkpoint saved in", log.read_text())
    if found is None:
        raise RuntimeError(f"{log}: the run did not report a checkpoint after SIGTERM; see the log's end")
    return int(found.group(1))


def soak_run(
    config: Path, output_dir: Path, steps: int, stops: list[int], interval: float, resume: bool
) -> list[Segment]:
    """Train `config` to `steps` in `output_dir`, stopped by SIGTERM at each step in `stops` and relaunched (with
    `--resume_from_checkpoint auto` when `resume`, as a requeued job would be) until it finishes."""
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    segments: list[Segment] = []
    start = 0
    for number, stop_at in enumerate([*stops, None]):
        log = output_dir.parent / f"{output_dir.name}.{number}.log"
        segment = run_segment(train_command(config, output_dir, steps, resume), log, start, stop_at, interval)
        segments.append(segment)
        expected = 0 if stop_at is None else 128 + signal.SIGTERM
        if segment.exit_code != expected:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"{log}: exit status {segment.exit_code}, expected {expected}:\n{tail}")
        segment.end_step = steps if stop_at is None else trained_to(log)
        start = segment.end_step
    return segments


def resource_growth(segment: Segment, warmup_steps: int) -> dict:
    """RSS, open files and threads at warm-up (the first reading at least `warmup_steps` after the segment's first
    step) and at its last reading while training."""
    after = [s for s in segment.samples if s.step >= segment.start_step + warmup_steps]
    if len(after) < 2:
        raise RuntimeError(
            f"segment from step {segment.start_step}: {len(after)} reading(s) after warm-up; lower --warmup_steps or "
            "--interval, or train longer"
        )
    first, last = after[0], after[-1]
    return {
        "steps": [first.step, last.step],
        "rss_mb": [round(first.rss_kb / 1024, 1), round(last.rss_kb / 1024, 1)],
        "rss_growth": round((last.rss_kb - first.rss_kb) / first.rss_kb, 4),
        "rss_peak_mb": round(max(s.rss_kb for s in after) / 1024, 1),
        "fds": [first.fds, last.fds],
        "threads": [first.threads, last.threads],
        "readings": len(after),
    }


def logged_steps(run_dir: Path) -> dict[int, dict]:
    """Each logged training step's values from `trainer_state.json`, without timings."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return {
        entry["step"]: {key: value for key, value in entry.items() if not key.startswith(NOT_COMPARED)}
        for entry in history
        if "loss" in entry
    }


def compare_logs(first: Path, second: Path) -> dict:
    """Whether two runs logged the same values at the same steps; the first difference if not."""
    a, b = logged_steps(first), logged_steps(second)
    difference = None
    if sorted(a) != sorted(b):
        difference = f"logged steps differ: {sorted(set(a) ^ set(b))[:10]}"
    else:
        for step in sorted(a):
            keys = sorted(set(a[step]) | set(b[step]))
            unequal = [key for key in keys if a[step].get(key) != b[step].get(key)]
            if unequal:
                key = unequal[0]
                difference = f"step {step}: {key} {a[step].get(key)!r} != {b[step].get(key)!r}"
                break
    return {"equal": difference is None, "logged_steps": len(a), "first_difference": difference}


def compare_weights(first: Path, second: Path) -> dict:
    """Whether two `model.safetensors` files hold the same tensors, bit for bit."""
    a, b = load_file(first), load_file(second)
    if a.keys() != b.keys():
        return {"equal": False, "tensors": len(a), "first_difference": f"names differ: {sorted(a.keys() ^ b.keys())}"}
    unequal = [name for name in sorted(a) if not torch.equal(a[name], b[name])]
    difference = None
    if unequal:
        name = unequal[0]
        gap = (a[name].double() - b[name].double()).abs().max().item() if a[name].shape == b[name].shape else None
        difference = f"{len(unequal)} tensors differ, first {name} (max |difference| {gap})"
    return {"equal": not unequal, "tensors": len(a), "first_difference": difference}


def soak(args: argparse.Namespace) -> dict:
    """Both runs, then every check; the summary the script prints last."""
    output = Path(args.output_dir).resolve()
    config = Path(args.config).resolve()
    stops = list(range(args.every, args.steps, args.every))
    runs = {
        "uninterrupted": soak_run(config, output / "uninterrupted", args.steps, [], args.interval, resume=False),
        "interrupted": soak_run(config, output / "interrupted", args.steps, stops, args.interval, resume=True),
    }
    (output / "readings.json").write_text(
        json.dumps({name: [asdict(segment) for segment in segments] for name, segments in runs.items()})
    )
    processes = []
    for name, segments in runs.items():
        for segment in segments:
            growth = resource_growth(segment, args.warmup_steps)
            processes.append({"run": name, "from_step": segment.start_step, "to_step": segment.end_step,
                              "minutes": segment.minutes, **growth})  # fmt: skip
    logs = compare_logs(output / "uninterrupted", output / "interrupted")
    weights = compare_weights(
        output / "uninterrupted" / "model.safetensors", output / "interrupted" / "model.safetensors"
    )
    checks = {
        "logged_values_equal": logs["equal"],
        "weights_equal": weights["equal"],
        "rss_growth_ok": all(p["rss_growth"] <= args.max_rss_growth for p in processes),
        "open_files_not_growing": all(p["fds"][1] <= p["fds"][0] for p in processes),
        "threads_not_growing": all(p["threads"][1] <= p["threads"][0] for p in processes),
    }
    return {
        "steps": args.steps,
        "sigterm_at": stops,
        "stopped_after": [segment.end_step for segment in runs["interrupted"][:-1]],
        "warmup_steps": args.warmup_steps,
        "max_rss_growth": args.max_rss_growth,
        "minutes": {name: round(sum(s.minutes for s in segments), 2) for name, segments in runs.items()},
        "logs": logs,
        "weights": weights,
        "processes": processes,
        "checks": checks,
        "passed": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "recipes" / "demo_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=500, help="steps between SIGTERMs")
    parser.add_argument("--warmup_steps", type=int, default=100, help="steps of each process before RSS is compared")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between /proc readings")
    parser.add_argument("--max_rss_growth", type=float, default=0.05)
    parser.add_argument("--output_dir", default="outputs/soak")
    args = parser.parse_args(argv)

    summary = soak(args)
    print(f"logged values: {summary['logs']}")
    print(f"final weights: {summary['weights']}")
    for p in summary["processes"]:
        print(f"{p['run']:>13} steps {p['from_step']:>5}-{p['to_step']:<5} ({p['minutes']:.1f} min): RSS "
              f"{p['rss_mb'][0]} -> {p['rss_mb'][1]} MB ({100 * p['rss_growth']:+.2f} %, steps {p['steps'][0]}-"
              f"{p['steps'][1]}), open files {p['fds'][0]} -> {p['fds'][1]}, threads {p['threads'][0]} -> "
              f"{p['threads'][1]}")  # fmt: skip
    for name, passed in summary["checks"].items():
        print(f"{name}: {'pass' if passed else 'FAIL'}")
    print(json.dumps(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
