"""Two processes on CPU with the real entry point: DDP, ZeRO-2, ZeRO-3 (+offload), resume, the final model, and
mixed text/image micro-batches across processes.

Each test launches `accelerate launch --config_file launch/<config>.yaml ... -m vlm_rl.train` with a recipe
written to tmp_path; the recipe is the same for every config (CPU settings come as flags, as docs/distributed.md
says). Every launch runs in its own process group and is killed whole when it runs past its time limit.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from vlm_rl.config import DataArguments
from vlm_rl.data import load_task
from vlm_rl.evaluation import evaluate_policy
from vlm_rl.models import load_model_and_processor
from vlm_rl.rewards import load_rewards

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")
DEEPSPEED_FLAGS = ("--ddp_backend", "gloo")  # DeepSpeed on CPU communicates over gloo

pytestmark = pytest.mark.scale

LENGTH_REWARD = '''
def text_length(completions, **kwargs):
    """Varies between samples of one prompt, so every step has advantages and gradients."""
    return [float(len(completion[0]["content"])) for completion in completions]
'''

# Records, per process, which of its rows had an image: the mixed-data test checks the split it relies on.
ROW_MARKER_REWARD = """
import json
import os


def row_marker(completions, images=None, **kwargs):
    with open(os.path.join(os.path.dirname(__file__), f"rows-rank{os.environ['RANK']}.jsonl"), "a") as f:
        f.write(json.dumps([bool(row) for row in images or [[]] * len(completions)]) + "\\n")
    return [float(len(completion[0]["content"])) for completion in completions]
"""

SMALL_RUN = {
    "model_name_or_path": "tiny:qwen2_vl",  # built by the main process at start-up (unpartitioned under ZeRO-3)
    "dtype": "float32",
    "dataset": "synthetic:shapes",
    "train_size": 32,
    "eval_size": 8,
    "reward_funcs": ["accuracy", "length.py:text_length"],
    "num_generations": 2,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "max_completion_length": 3,
    "max_steps": 2,
    "learning_rate": 1.0e-2,
    "lr_scheduler_type": "constant",
    "seed": 0,
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "plot": False,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_recipe(directory: Path, **overrides) -> Path:
    (directory / "length.py").write_text(LENGTH_REWARD)
    recipe = {**SMALL_RUN, "output_dir": str(directory / "run"), **overrides}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(config: str, recipe: Path, *flags: str, script: Path | None = None, timeout: float = 300):
    """`accelerate launch` two processes; returns (exit code or None on timeout, combined output)."""
    entry = [str(script)] if script else ["-m", "vlm_rl.train"]
    command = [
        str(ACCELERATE), "launch", "--config_file", str(REPO / "launch" / config), "--num_processes", "2",
        "--main_process_port", str(free_port()), *entry, "--config", str(recipe), *flags,
    ]  # fmt: skip
    code, output = run_launchers([command], recipe.parent, timeout)
    return code[0], output


def start_launchers(commands: list[list[str]], directory: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    """Start launch commands side by side (one per simulated node), each in its own session; their logs."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    first = len(list(directory.glob("launch-*.log")))
    log_paths = [directory / f"launch-{first + i}.log" for i in range(len(commands))]
    processes = []
    for command, log_path in zip(commands, log_paths, strict=True):
        with open(log_path, "w") as log:
            processes.append(
                subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    return processes, log_paths


def run_launchers(commands: list[list[str]], directory: Path, timeout: float) -> tuple[list[int | None], str]:
    """Run launch commands side by side (one per simulated node); exit codes (None: killed at the time limit)."""
    processes, log_paths = start_launchers(commands, directory)
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for process, code in zip(processes, codes, strict=True):
        if code is None:
            # torch's launcher starts each rank in a session of its own, which killing the launcher's misses.
            for rank in psutil.Process(process.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    rank.kill()
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return codes, "\n".join(path.read_text() for path in log_paths)


def check_ran(code: int | None, output: str) -> None:
    assert code == 0, f"the launch {'timed out' if code is None else f'exited with {code}'}:\n{output[-6000:]}"


def check_left_together(output: str) -> None:
    """No process exits before the main one has written the model card: one that leaves early can abort (SIGABRT)
    in its C++ teardown while the other still works, and the launcher then kills the run."""
    card = output.rindex("Model card:")
    assert all(output.rindex(f"Process {rank} of 2: done.") > card for rank in (0, 1)), output[-4000:]


def setup_line(output: str) -> str:
    """The start-up line each process logs; DeepSpeed silently dropped would show here (see FACTS)."""
    lines = re.findall(r"Training setup: (.*)\.", output)
    assert len(lines) == 2, output[-4000:]  # one per process
    return lines[0]


def trainer_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "trainer_state.json").read_text())


def check_trained(run_dir: Path, steps: int) -> list[dict]:
    """`steps` optimizer steps ran, each with a finite loss and a non-zero gradient."""
    state = trainer_state(run_dir)
    assert state["global_step"] == steps
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, steps + 1))
    for entry in logged:
        assert torch.isfinite(torch.tensor(entry["loss"])), entry
        assert entry["grad_norm"] > 0, entry
    return logged


def test_ddp_on_two_cpu_processes(tmp_path):
    code, output = launch("cpu_ddp.yaml", write_recipe(tmp_path))
    check_ran(code, output)
    check_left_together(output)
    setup = setup_line(output)
    assert setup.startswith("2 process(es), distributed type MULTI_CPU"), setup
    run_dir = tmp_path / "run"
    check_trained(run_dir, 2)
    assert (run_dir / "model.safetensors").is_file()
    assert json.loads((run_dir / "eval_results.json").read_text())["num_rows"] == 8


@pytest.mark.parametrize(
    ("config", "setup"),
    [
        ("zero2.yaml", "ZeRO stage 2, offload optimizer: none, parameters: none"),
        ("zero3_offload.yaml", "ZeRO stage 3, offload optimizer: cpu, parameters: cpu"),
    ],
)
def test_deepspeed_on_two_cpu_processes(config, setup, tmp_path):
    # The first offload run on a machine builds DeepSpeed's CPU Adam op (about a minute).
    code, output = launch(config, write_recipe(tmp_path), *DEEPSPEED_FLAGS, timeout=480)
    check_ran(code, output)
    assert setup_line(output) == f"2 process(es), distributed type DEEPSPEED, {setup}"
    check_trained(tmp_path / "run", 2)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_zero3_checkpoints_resume_and_final_model(tmp_path):
    recipe = write_recipe(tmp_path, save_strategy="steps", save_steps=1)
    run_dir = tmp_path / "run"
    code, output = launch("zero3.yaml", recipe, *DEEPSPEED_FLAGS)
    check_ran(code, output)
    assert (
        setup_line(output)
        == "2 process(es), distributed type DEEPSPEED, ZeRO stage 3, offload optimizer: none, parameters: none"
    )
    check_trained(run_dir, 2)
    checkpoint = run_dir / "checkpoint-2"
    assert (checkpoint / "global_step2").is_dir()  # DeepSpeed's sharded states, for resuming
    assert (checkpoint / "model.safetensors").is_file()  # and the gathered weights

    code, output = launch(
        "zero3.yaml", recipe, *DEEPSPEED_FLAGS, "--max_steps", "4", "--resume_from_checkpoint", "auto"
    )
    check_ran(code, output)
    check_left_together(output)
    assert f"resuming from {checkpoint}" in output
    logged = check_trained(run_dir, 4)  # steps 1-2 from the checkpoint's history, 3-4 from this run
    assert logged[2]["num_tokens"] > logged[1]["num_tokens"]  # the token count carried on from the checkpoint

    # The final model is a whole, normal directory: every weight of the initial model, trained, in one file.
    initial = load_file(run_dir / "tiny-qwen2_vl" / "model.safetensors")
    final = load_file(run_dir / "model.safetensors")
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in initial.items()}
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
    model, processor = load_model_and_processor(str(run_dir), dtype="float32")

    # The final evaluation ran on those gathered weights: the reloaded model generates the same completions.
    data_args = DataArguments(dataset="synthetic:shapes", train_size=32, eval_size=8)
    task = load_task(data_args, seed=0)
    records = evaluate_policy(model, processor, task.eval, load_rewards(["accuracy"]), max_new_tokens=3, batch_size=4)
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in records] == [s["completion"] for s in samples]
    assert json.loads((run_dir / "eval_results.json").read_text())["global_step"] == 4


def test_zero3_lora_checkpoints_resume_and_export(tmp_path):
    """LoRA (language model and vision tower) under ZeRO-3 with a KL term: adapters in checkpoints, resume, export."""
    recipe = write_recipe(
        tmp_path, use_peft=True, lora_r=8, lora_vision_tower=True, beta=0.04, save_strategy="steps", save_steps=1
    )
    run_dir = tmp_path / "run"
    code, output = launch("zero3.yaml", recipe, *DEEPSPEED_FLAGS)
    check_ran(code, output)
    check_trained(run_dir, 2)
    checkpoint = run_dir / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "ref").exists()
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert any(".visual." in name for name in adapter) and any("language_model" in name for name in adapter)
    assert json.loads((run_dir / "eval_results.json").read_text())["global_step"] == 2

    code, output = launch(
        "zero3.yaml", recipe, *DEEPSPEED_FLAGS, "--max_steps", "3", "--resume_from_checkpoint", "auto"
    )
    check_ran(code, output)
    check_left_together(output)
    assert f"resuming from {checkpoint}" in output
    check_trained(run_dir, 3)

    merged = tmp_path / "merged"
    subprocess.run(
        [sys.executable, "-m", "vlm_rl.cli", "export", "--checkpoint", str(run_dir), "--output_dir", str(merged)],
        check=True, timeout=300,
    )  # fmt: skip
    model, processor = load_model_and_processor(str(merged), dtype="float32")
    inputs = processor(text=["Hello"], return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]


def multi_node_commands(recipe: Path, *flags: str) -> list[list[str]]:
    """launch/multi_node_zero3.yaml as launch/slurm_multinode.sh runs it: one launcher per "node", one process each,
    both on this host."""
    node = [
        str(ACCELERATE), "launch", "--config_file", str(REPO / "launch" / "multi_node_zero3.yaml"),
        "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    entry = ["-m", "vlm_rl.train", "--config", str(recipe), *DEEPSPEED_FLAGS, *flags]
    return [[*node, "--machine_rank", str(rank), *entry] for rank in (0, 1)]


def test_multi_node_template_as_two_machines_on_one_host(tmp_path):
    # launch/multi_node_zero3.yaml as launch/slurm_multinode.sh runs it, one launcher per "node" (one process each).
    codes, output = run_launchers(multi_node_commands(write_recipe(tmp_path)), tmp_path, timeout=300)
    assert codes == [0, 0], output[-6000:]
    assert setup_line(output).startswith("2 process(es), distributed type DEEPSPEED, ZeRO stage 3")
    check_trained(tmp_path / "run", 2)


def test_zero3_without_gathered_save_is_refused_at_start_up(tmp_path):
    config = yaml.safe_load((REPO / "launch" / "zero3.yaml").read_text())
    config["deepspeed_config"]["zero3_save_16bit_model"] = False
    (tmp_path / "zero3_shards_only.yaml").write_text(yaml.safe_dump(config))
    code, output = launch(str(tmp_path / "zero3_shards_only.yaml"), write_recipe(tmp_path), *DEEPSPEED_FLAGS)
    assert code != 0
    assert "Set `zero3_save_16bit_model: true`" in output
    assert not (tmp_path / "run" / "trainer_state.json").exists()


def mixed_data_recipe(directory: Path, **overrides) -> Path:
    """Each step gives process 0 a text-only prompt and process 1 a prompt with an image (shuffling off).

    Two prompts per step, two samples each, two per process: process 0 gets prompt 2k, process 1 prompt 2k+1.
    """
    (directory / "images").mkdir()
    colours = ["red", "green", "blue", "yellow"]
    with open(directory / "train.jsonl", "w") as f:
        for i in range(8):
            row = {"question": f"Which colour is it? ({i})", "label": colours[i % 4], "image": None}
            if i % 2:
                Image.new("RGB", (32, 32), colours[i % 4]).save(directory / f"images/{i}.png")
                row["image"] = f"images/{i}.png"
            f.write(json.dumps(row) + "\n")
    (directory / "marker.py").write_text(ROW_MARKER_REWARD)
    return write_recipe(
        directory,
        dataset=str(directory / "train.jsonl"),
        train_size=None,
        eval_size=None,
        column_mapping={"label": "answer"},
        prompt_template="{question}",
        shuffle_dataset=False,
        reward_funcs=["accuracy", "marker.py:row_marker"],
        per_device_train_batch_size=2,
        final_eval=False,
        **overrides,
    )


def rows_with_images(directory: Path, rank: int) -> list[list[bool]]:
    return [json.loads(line) for line in (directory / f"rows-rank{rank}.jsonl").read_text().splitlines()]


def test_zero3_mixed_text_and_image_processes_do_not_hang(tmp_path):
    code, output = launch("zero3.yaml", mixed_data_recipe(tmp_path), *DEEPSPEED_FLAGS, timeout=240)
    check_ran(code, output)
    check_trained(tmp_path / "run", 2)
    assert rows_with_images(tmp_path, 0)[0] == [False, False]  # step 1: process 0 has text only ...
    assert rows_with_images(tmp_path, 1)[0] == [True, True]  # ... while process 1 has images


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])  # Qwen3-VL also feeds deepstack features
def test_ddp_mixed_text_and_image_processes_without_find_unused_parameters(family, tmp_path):
    # DDP waits for a gradient of every weight when `find_unused_parameters` is off; without the dummy vision
    # forward this run hangs (measured: killed after 200 s), and so did Qwen3-VL's before the dummy fed its deepstack
    # features.
    recipe = mixed_data_recipe(tmp_path, model_name_or_path=f"tiny:{family}")
    code, output = launch("cpu_ddp.yaml", recipe, "--ddp_find_unused_parameters", "false", timeout=240)
    check_ran(code, output)
    check_trained(tmp_path / "run", 2)
    assert rows_with_images(tmp_path, 0)[0] == [False, False]
    assert rows_with_images(tmp_path, 1)[0] == [True, True]


def test_completion_logs_gather_images_from_every_process(tmp_path):
    # TRL gathers the logged images only on processes whose batch has one: the text-only process skipped the
    # collective and the run hung. Every process gathers now, and the main process's table has each row's images.
    recipe = mixed_data_recipe(tmp_path, model_name_or_path="tiny:qwen2_vl")
    code, output = launch("cpu_ddp.yaml", recipe, "--log_completions", "true", timeout=240)
    check_ran(code, output)
    check_trained(tmp_path / "run", 2)
    assert rows_with_images(tmp_path, 0)[0] == [False, False] and rows_with_images(tmp_path, 1)[0] == [True, True]
    first_step = pd.read_parquet(tmp_path / "run" / "completions" / "completions_00001.parquet")
    assert sorted(first_step["num_images"]) == [0, 0, 1, 1]  # both processes' rows, each with its own images
    assert (first_step["num_images"] == first_step["prompt"].str.count("<image>")).all()


def test_zero3_mixed_data_fails_without_the_dummy_vision_forward(tmp_path):
    script = REPO / "tests" / "distributed" / "train_without_dummy_vision_forward.py"
    code, output = launch("zero3.yaml", mixed_data_recipe(tmp_path), *DEEPSPEED_FLAGS, script=script, timeout=240)
    assert code != 0  # a hang (killed at the time limit, None) or a collective failing across processes
    assert not (tmp_path / "run" / "trainer_state.json").exists()
    assert rows_with_images(tmp_path, 0)[0] == [False, False]
    assert rows_with_images(tmp_path, 1)[0] == [True, True]


def test_dynamic_sampling_keeps_the_same_number_of_rows_on_every_process(tmp_path):
    """Two processes decide alike from the gathered rewards: the same extra rounds (no collective waits for a process
    that skipped it) and the same number of rows, each from a group with a reward spread unless padded back in."""
    script = REPO / "tests" / "distributed" / "record_dynamic_sampling.py"
    fields = {"dynamic_sampling": True, "max_resample_rounds": 2, "max_completion_length": 1, "max_steps": 3}
    code, output = launch("cpu_ddp.yaml", write_recipe(tmp_path, **fields), script=script)
    check_ran(code, output)
    logged = check_trained(tmp_path / "run", 3)
    assert any(entry["dynamic_sampling/rounds"] >= 1 for entry in logged), logged
    records = [
        [json.loads(line) for line in (tmp_path / "run" / f"dynamic-rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    ]
    assert len(records[0]) == len(records[1]) == 3
    for first, second in zip(*records, strict=True):
        assert first["rows"] == second["rows"] == 4  # per_device_train_batch_size
        assert first["rounds"] == second["rounds"] and first["padded_groups"] == second["padded_groups"]
        for record in (first, second):  # groups of 2: a padded group is one whose rewards did not vary
            assert record["signal_rows"] >= record["rows"] - 2 * record["padded_groups"]


def logged_steps(run_dir: Path) -> dict[int, dict]:
    """Each step's logged values without timings (which differ from run to run)."""
    return {
        entry["step"]: {k: v for k, v in entry.items() if not k.startswith(("timing/", "step_time"))}
        for entry in trainer_state(run_dir)["log_history"]
        if "loss" in entry
    }


def test_ddp_resume_inside_a_generation_cycle_matches_the_uninterrupted_run(tmp_path):
    """Each process restores its own buffered generations: the resumed run logs and ends as the uninterrupted one."""
    fields = {"max_steps": 4, "steps_per_generation": 2, "num_iterations": 2, "save_strategy": "steps"}
    fields |= {"save_steps": 1, "final_eval": False}
    code, output = launch("cpu_ddp.yaml", write_recipe(tmp_path, **fields))
    check_ran(code, output)
    full = tmp_path / "run"
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    recipe = write_recipe(resumed_dir, **fields)
    resumed = resumed_dir / "run"
    resumed.mkdir()
    for name in ("tiny-qwen2_vl", "checkpoint-3"):  # stopped after step 3, inside the one generation cycle
        shutil.copytree(full / name, resumed / name)
    assert sorted(path.name for path in (resumed / "checkpoint-3").glob("rollout_state_*.pt")) == [
        "rollout_state_0.pt",
        "rollout_state_1.pt",
    ]
    code, output = launch("cpu_ddp.yaml", recipe, "--resume_from_checkpoint", "auto")
    check_ran(code, output)
    assert "without its buffered generations" not in output
    assert logged_steps(resumed)[4] == logged_steps(full)[4]
    final, expected = load_file(resumed / "model.safetensors"), load_file(full / "model.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_sigterm_to_the_launcher_stops_every_process_at_one_checkpoint(tmp_path):
    """accelerate's launcher forwards SIGTERM to both processes; they agree on the step, save it and stop."""
    recipe = write_recipe(tmp_path, max_steps=200, final_eval=False)
    run_dir = tmp_path / "run"
    command = [
        str(ACCELERATE), "launch", "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"), "--num_processes", "2",
        "--main_process_port", str(free_port()), "-m", "vlm_rl.train", "--config", str(recipe),
    ]  # fmt: skip
    log_path = tmp_path / "launch.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"^step \d+/\d+ \|", log_path.read_text(), re.MULTILINE):  # a logged step
            assert launcher.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    output = log_path.read_text()
    (checkpoint,) = run_dir.glob("checkpoint-*")
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    assert output.count(f"Stopped by SIGTERM after step {step}") == 2, output[-4000:]  # both processes, one step
    assert sorted(path.name for path in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    code, output = launch("cpu_ddp.yaml", recipe, "--max_steps", str(step + 2), "--resume_from_checkpoint", "auto")
    check_ran(code, output)
    check_left_together(output)
    assert f"resuming from {checkpoint}" in output
    check_trained(run_dir, step + 2)
