"""Faults that used to hang a run, each injected into a real run: a node lost, a peer stuck, a step that never ends.

`step_timeout` (vlm_rl/trainers/step_timeout.py) bounds each; the exit times measured here are in
docs/reliability.md. The multi-process runs are launched as in tests/test_distributed.py (CPU, gloo), the two-node
ones with launch/multi_node_zero3.yaml as two launchers on this host; every process they start is killed in a
`finally`, a SIGSTOPped one included.
"""

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from test_distributed import SMALL_RUN, check_trained, launch, multi_node_commands, start_launchers

from vlm_rl.checkpoints import latest_checkpoint
from vlm_rl.train import main as train_main
from vlm_rl.trainers.step_timeout import EXIT_CODE, StepTimeout

# Scores completions by length; slowed by `slow` (seconds per call, while that file exists, so that a fault lands
# mid-run) and stuck for good at the call `hang.json` names on the ranks it names (while that file exists).
FAULTS_REWARD = """
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).parent
calls = 0


def scored(completions, **kwargs):
    global calls
    calls += 1
    rank = int(os.environ.get("RANK", 0))
    if (HERE / "slow").exists():
        time.sleep(float((HERE / "slow").read_text()))
    plan = json.loads((HERE / "hang.json").read_text()) if (HERE / "hang.json").exists() else {}
    if calls == plan.get("call") and rank in plan["ranks"]:
        (HERE / f"hanging-rank{rank}").write_text(str(time.time()))
        while True:  # a reward server that stopped answering, a deadlock
            time.sleep(1)
    return [float(len(completion[0]["content"])) for completion in completions]
"""
# Where the stuck reward waits, as the stack dump shows it.
REWARD_FRAME = f'faults.py", line {FAULTS_REWARD.splitlines().index("            time.sleep(1)") + 1} in scored'


def write_recipe(directory: Path, **overrides) -> Path:
    (directory / "faults.py").write_text(FAULTS_REWARD)
    recipe = {
        **SMALL_RUN,
        "reward_funcs": ["faults.py:scored"],
        "reward_timeout": 0,  # nothing but step_timeout ends the stuck reward
        "eval_size": 0,
        "final_eval": False,
        "save_strategy": "steps",
        "save_steps": 1,
        "output_dir": str(directory / "run"),
        **overrides,
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def hang_at(directory: Path, call: int, ranks: list[int]) -> None:
    (directory / "hang.json").write_text(json.dumps({"call": call, "ranks": ranks}))


def run_forked(target: Callable[[], object], log: Path, timeout: float) -> int | None:
    """`target()` (e.g. `vlm-rl train`) in a child forked from this process, whose imports are done (a fresh
    interpreter spends some 15 s importing): its exit status, or None when it was killed at the time limit. Its
    output goes to `log`."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            logging.root.handlers.clear()  # pytest's capture; `main` sets up logging to stderr
            target()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_a_hung_reward_ends_the_run_with_its_stack_and_auto_resumes(tmp_path):
    recipe, run_dir, log = write_recipe(tmp_path, max_steps=3), tmp_path / "run", tmp_path / "run.log"
    hang_at(tmp_path, call=2, ranks=[0])
    code = run_forked(lambda: train_main(["--config", str(recipe), "--step_timeout", "4"]), log, timeout=60)
    ended = time.time()
    output = log.read_text()
    assert code == EXIT_CODE, output[-4000:]
    took = ended - float((tmp_path / "hanging-rank0").read_text())
    assert took < 4 + 3, took  # measured: 4.3 s; without step_timeout still running after 60 s
    checkpoint = run_dir / "checkpoint-1"
    assert (
        f"step_timeout: step 2 did not finish within 4 s on rank 0; the last complete checkpoint is {checkpoint} "
        "(run the same command with --resume_from_checkpoint auto to continue)"
    ) in output
    assert REWARD_FRAME in output, output[-4000:]  # where it is stuck, from the dump of every thread's stack

    (tmp_path / "hang.json").unlink()
    code = run_forked(lambda: train_main(["--config", str(recipe), "--resume_from_checkpoint", "auto"]), log, 60)
    output = log.read_text()
    assert code == 0, output[-4000:]
    assert f"resuming from {checkpoint}" in output
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == 3


def test_heartbeats_name_the_ranks_that_stopped_answering(tmp_path):
    """What a timed-out rank 0 reports of ranks 1-3: one beating, one silent, one writing elsewhere (no shared
    output_dir). The watchdog threads are not started here (they would end pytest): heartbeats are driven by hand."""
    ranks = [StepTimeout(60, tmp_path / "run", rank, 4, run_id="run-a") for rank in range(3)]
    ranks.append(StepTimeout(60, tmp_path / "elsewhere", 3, 4, run_id="run-a"))
    for watchdog in ranks:
        watchdog.heartbeats.mkdir(parents=True, exist_ok=True)
        watchdog._beat()
    ranks[0].interval = 0.2
    stop = threading.Event()

    def beat_rank_1() -> None:
        while not stop.wait(0.05):
            ranks[1]._beat()

    beating = threading.Thread(target=beat_rank_1)
    beating.start()
    try:
        assert ranks[0]._silent_ranks() == ([2], [3])
    finally:
        stop.set()
        beating.join()
    # A previous run's heartbeats in the same output_dir count as none.
    assert StepTimeout(60, tmp_path / "run", 0, 2, run_id="run-b")._read("rank-1.json") is None


def test_a_rank_that_gave_up_stops_the_others(tmp_path):
    """Rank 1's watchdog, its own deadline far off, sees rank 0's marker: it dumps its stack and exits as well."""
    heartbeats = tmp_path / "run" / ".step_timeout"

    def rank_1_waiting() -> None:
        logging.basicConfig(level=logging.INFO)
        StepTimeout(20, tmp_path / "run", 1, 2, run_id="run-a").start()
        (heartbeats / "expired.json").write_text(json.dumps({"run": "run-a", "rank": 0, "what": "step 3"}))
        time.sleep(60)  # the main thread, waiting in a collective for rank 0

    started = time.monotonic()
    code = run_forked(rank_1_waiting, tmp_path / "rank1.log", timeout=30)
    output = (tmp_path / "rank1.log").read_text()
    assert code == EXIT_CODE, output
    assert time.monotonic() - started < 10  # one heartbeat interval (2 s), not the 20 s deadline
    assert "step_timeout: rank 0 gave up on step 3; rank 1 stops too" in output
    assert "in rank_1_waiting" in output  # the stack of the waiting main thread


@pytest.mark.scale
def test_a_hung_reward_on_one_of_two_processes_ends_both(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=4, save_steps=2)
    hang_at(tmp_path, call=3, ranks=[1])
    code, output = launch("cpu_ddp.yaml", recipe, "--step_timeout", "10", timeout=240)
    took = time.time() - float((tmp_path / "hanging-rank1").read_text())
    assert code not in (0, None), output[-6000:]
    # The timeout, three heartbeats to name the silent ranks, the launcher's teardown. Measured: 13.4 and 13.6 s;
    # without step_timeout still running after 90 s.
    assert took < 10 + 15, took
    assert "step_timeout: step 3 did not finish within 10 s on rank 1; every rank still answers" in output
    assert "Stack of every thread of rank 1 follows" in output and REWARD_FRAME in output, output[-6000:]


@contextlib.contextmanager
def two_nodes(recipe: Path, *flags: str) -> Iterator[tuple[list, list[Path]]]:
    """Launchers of two "nodes" (launch/multi_node_zero3.yaml), each with one worker; all killed on the way out."""
    launchers, logs = start_launchers(multi_node_commands(recipe, *flags), recipe.parent)
    processes = [psutil.Process(launcher.pid) for launcher in launchers]
    try:
        yield launchers, logs
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                processes += process.children(recursive=True)
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()  # SIGKILL ends a stopped process too
        for launcher in launchers:
            launcher.wait()


def worker(launcher) -> psutil.Process:
    (process,) = psutil.Process(launcher.pid).children()  # accelerate's launcher starts the node's one process
    return process


def wait_for(path: Path, launchers: list, logs: list[Path], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        ended = [launcher.poll() is not None for launcher in launchers]
        assert not any(ended) and time.monotonic() < deadline, "\n".join(log.read_text()[-3000:] for log in logs)
        time.sleep(0.2)


def resume_two_nodes(recipe: Path, steps: int) -> None:
    """The same command with `--resume_from_checkpoint auto` continues from the last complete checkpoint to the end."""
    (recipe.parent / "slow").unlink()
    run_dir = recipe.parent / "run"
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    with two_nodes(recipe, "--resume_from_checkpoint", "auto") as (launchers, logs):
        codes = [launcher.wait(timeout=300) for launcher in launchers]
    output = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0], output[-6000:]
    assert f"resuming from {checkpoint}" in output
    check_trained(run_dir, steps)


@pytest.mark.scale
def test_a_node_killed_ends_the_other_and_auto_resumes(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=6, save_steps=2)
    (tmp_path / "slow").write_text("1")
    with two_nodes(recipe) as (launchers, logs):
        wait_for(tmp_path / "run" / "checkpoint-2", launchers, logs)
        node = worker(launchers[1])
        os.killpg(launchers[1].pid, signal.SIGKILL)  # node 1 lost: its launcher and its worker
        node.kill()
        killed = time.monotonic()
        code = launchers[0].wait(timeout=120)
        took = time.monotonic() - killed
        output = logs[0].read_text()
    assert code != 0, output[-4000:]
    assert took < 20, took  # measured: 4.8 and 5.3 s (gloo sees the peer's sockets close)
    resume_two_nodes(recipe, 6)


@pytest.mark.scale
def test_a_stuck_peer_ends_within_the_step_timeout_and_auto_resumes(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=6, save_steps=2)
    (tmp_path / "slow").write_text("1")
    with two_nodes(recipe, "--step_timeout", "45") as (launchers, logs):
        wait_for(tmp_path / "run" / "checkpoint-2", launchers, logs)
        worker(launchers[1]).suspend()  # SIGSTOP: alive, sockets open, never answering
        stopped = time.monotonic()
        code = launchers[0].wait(timeout=120)
        took = time.monotonic() - stopped
        output = logs[0].read_text()
    assert code != 0, output[-4000:]
    assert took < 90, took  # measured: 62 and 63 s; without step_timeout still waiting after 120 s
    assert "on rank 0; ranks that stopped answering: [1]; the last complete checkpoint is" in output, output[-4000:]
    assert "Stack of every thread of rank 0 follows" in output and "most recent call first" in output
    resume_two_nodes(recipe, 6)
