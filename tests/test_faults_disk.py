"""A disk that fills while a checkpoint is written: the run stops with one line naming the fault, the partial
checkpoint is gone, the previous one stays what `--resume_from_checkpoint auto` picks, and the resume finishes.

Two ways in: the write failing with ENOSPC partway through a file (fault injection into `torch.save`; the
checkpoint code under test is real), and a real full file system (a small tmpfs mounted in a user namespace, where
the system allows one): there a full disk does not even reach Python as `OSError`.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_data_training import TINY_RUN
from test_distributed import check_ran, launch
from test_distributed import write_recipe as write_two_process_recipe

from vlm_rl.checkpoints import STAGING_DIR, checkpoint_problem, latest_checkpoint
from vlm_rl.models import build_tiny_model
from vlm_rl.train import main as train_main

RUN = {
    **TINY_RUN,
    "dataset": "synthetic:shapes",
    "train_size": 4,
    "per_device_train_batch_size": 2,
    "save_strategy": "steps",
    "save_steps": 1,
    "max_steps": 3,
    "final_eval": False,
}


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl")


def write_recipe(directory: Path, model: Path, output_dir: Path) -> Path:
    recipe = directory / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RUN, "model_name_or_path": str(model), "output_dir": str(output_dir)}))
    return recipe


def logged_steps(run: Path) -> list[int]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return [entry["step"] for entry in history if "loss" in entry]


def check_stopped_and_resume(recipe: Path, run: Path, message: str, cause: str) -> None:
    """What a run stopped by a full disk while saving `checkpoint-2` must leave, and that `auto` resumes it."""
    assert message.count("\n") == 0 and message.startswith(f"vlm-rl train: error: {cause}")
    assert f"writing checkpoint-2 in {run}" in message
    assert f"the last complete checkpoint, {run / 'checkpoint-1'}, is what --resume_from_checkpoint auto" in message
    assert "Free space there" in message
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (run / STAGING_DIR).exists()  # the partial checkpoint's space is given back
    assert latest_checkpoint(run) == run / "checkpoint-1"
    train_main(["--config", str(recipe), "--resume_from_checkpoint", "auto"])
    assert logged_steps(run) == [1, 2, 3]
    assert checkpoint_problem(run / "checkpoint-3") is None


def test_enospc_partway_through_a_checkpoint_stops_and_auto_resumes(tiny_qwen, tmp_path, monkeypatch):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_qwen, run)
    real_save = torch.save

    def fills_the_disk(obj, f, *args, **kwargs):
        """torch.save, except that in checkpoint-2 the file stops at half its length with ENOSPC."""
        if "checkpoint-2" not in str(f):
            return real_save(obj, f, *args, **kwargs)
        real_save(obj, f, *args, **kwargs)
        path = Path(f)
        with path.open("r+b") as file:
            file.truncate(path.stat().st_size // 2)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(SystemExit) as stopped:
        train_main(["--config", str(recipe)])
    monkeypatch.setattr(torch, "save", real_save)
    check_stopped_and_resume(recipe, run, str(stopped.value.code), "Disk full (No space left on device")


def user_namespaces() -> bool:
    """Whether an unprivileged user may mount a tmpfs here (a user and mount namespace)."""
    try:
        probe = ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# Inside a user namespace: a tmpfs as the output directory, room enough for the first run (one checkpoint), then
# shrunk to leave half a checkpoint's size free; what the second run leaves is copied out.
FULL_DISK_SCRIPT = """
import json, shutil, subprocess, sys
from pathlib import Path
from vlm_rl.train import main

recipe, run, out = Path({recipe!r}), Path({run!r}), Path({out!r})
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "none", str(run)], check=True)
main(["--config", str(recipe), "--max_steps", "1"])
checkpoint = sum(path.stat().st_size for path in (run / "checkpoint-1").rglob("*") if path.is_file())
size = shutil.disk_usage(run).used + checkpoint // 2
subprocess.run(["mount", "-o", f"remount,size={{size}}", str(run)], check=True)
try:
    main(["--config", str(recipe), "--resume_from_checkpoint", "auto"])
    message = None
except SystemExit as stop:
    message = str(stop.code)
shutil.copytree(run, out)
(out.parent / "stopped.json").write_text(json.dumps({{"message": message, "checkpoint_bytes": checkpoint}}))
"""


@pytest.mark.slow  # ~25 s: a fresh Python and three tiny runs
@pytest.mark.skipif(not shutil.which("unshare") or not user_namespaces(), reason="no unprivileged user namespaces")
def test_a_real_full_file_system_stops_the_run_and_auto_resumes(tiny_qwen, tmp_path):
    mounted = Path("/mnt")  # in a mount namespace of its own: nothing outside it sees this mount
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_qwen, mounted)
    script = FULL_DISK_SCRIPT.format(recipe=str(recipe), run=str(mounted), out=str(out))
    subprocess.run(["unshare", "-Urm", sys.executable, "-c", script], check=True, timeout=300)
    message = json.loads((tmp_path / "stopped.json").read_text())["message"]
    assert message is not None, "the run did not stop on the full disk"
    # Resumed where there is room: the output directory moved, as a user might free space.
    run = tmp_path / "run"
    shutil.move(out, run)
    recipe = write_recipe(tmp_path, tiny_qwen, run)
    message = message.replace(str(mounted), str(run))
    check_stopped_and_resume(recipe, run, message, "Disk full (No space left on device")


# `vlm_rl.train` with torch.save failing with ENOSPC on process 1 alone, in checkpoint-2 (its RNG state).
ONE_PROCESS_FULL = """
import errno, os, sys
import torch
from vlm_rl.train import main

real_save = torch.save

def fills_the_disk(obj, f, *args, **kwargs):
    if os.environ["RANK"] == "1" and "checkpoint-2" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real_save(obj, f, *args, **kwargs)

torch.save = fills_the_disk
main(sys.argv[1:])
"""


@pytest.mark.scale
def test_a_write_failing_on_one_of_two_processes_stops_both(tmp_path):
    """Process 0 writes its part of checkpoint-2 whole, process 1 fails: both stop at that save with the message,
    and `auto` resumes from checkpoint-1 with two processes."""
    recipe = write_two_process_recipe(tmp_path, save_strategy="steps", save_steps=1, max_steps=3)
    script = tmp_path / "one_process_full.py"
    script.write_text(ONE_PROCESS_FULL)
    start = time.monotonic()
    code, output = launch("cpu_ddp.yaml", recipe, script=script, timeout=240)
    print(f"two processes stopped in {time.monotonic() - start:.0f} s")
    assert code not in (0, None), output[-4000:]  # stopped, not hung
    run = tmp_path / "run"
    lines = [line for line in output.splitlines() if line.startswith("vlm-rl train: error: Disk full")]
    assert len(lines) == 2, output[-4000:]  # one per process
    assert f"writing checkpoint-2 in {run}" in lines[0]
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (run / STAGING_DIR).exists()
    check_ran(*launch("cpu_ddp.yaml", recipe, "--resume_from_checkpoint", "auto", timeout=240))
    assert logged_steps(run) == [1, 2, 3]
