"""The vLLM server going away mid-run (`vllm_mode: server`, the tiny Qwen2-VL on CPU, a real `vlm-rl vllm-serve`
on 127.0.0.1 killed with SIGKILL):

- killed and started again on the same port: the trainer waits for it, sends it the trained weights again, and the
  run finishes with vLLM's log-probs still matching the trainer's (a restarted server holds the base weights);
- killed for good: the run stops within `vllm_server_retry_timeout` plus a margin, with the reason in one message
  and a checkpoint that `--resume_from_checkpoint auto` continues from once a server is back.

A server start takes 70-110 s on a busy 2-core machine, so the tests share one server, restarted as they go.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_vllm import MAX_PIXELS, SYNCED_GAP, CompletionLog, free_port, load_policy, logp_gaps, rows, vllm_config
from transformers import TrainerCallback

from vlm_rl.checkpoints import latest_checkpoint, resolve_resume
from vlm_rl.models import build_tiny_model
from vlm_rl.rollout.server_retry import VLLMServerGone
from vlm_rl.rollout.vllm import VLMRollout
from vlm_rl.trainers import VLMGRPOTrainer

pytestmark = pytest.mark.scale

GIVE_UP_AFTER = 8.0  # seconds: vllm_server_retry_timeout of the run whose server does not come back
# What stopping takes besides the waiting: the last failed request, the checkpoint of the tiny model.
STOP_MARGIN = 15.0


class Server:
    """`vlm-rl vllm-serve` for one recipe, on a fixed port, that the tests kill and start again."""

    def __init__(self, directory: Path, model: Path):
        self.port = free_port()
        self.directory = directory
        recipe = {
            "model_name_or_path": str(model),
            "dtype": "float32",
            "max_pixels": MAX_PIXELS,
            "vllm_server_host": "127.0.0.1",
            "vllm_server_port": self.port,
            "vllm_max_model_length": 512,
            "vllm_limit_mm_per_prompt": 2,
            "output_dir": str(directory / "server"),
            "use_cpu": True,
            "bf16": False,
        }
        self.recipe = directory / "recipe.yaml"
        self.recipe.write_text(yaml.safe_dump(recipe))
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.start_seconds: list[float] = []  # how long each start took to answer /health

    @property
    def log(self) -> Path:
        return self.directory / f"server-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        self.started_at = time.monotonic()
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vlm_rl.cli", "vllm-serve", "--config", str(self.recipe), "--",
                 "--max-num-seqs", "16"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def wait_up(self, timeout: float = 300) -> None:
        import requests  # installed with vLLM (the default suite imports this module without it)

        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"vlm-rl vllm-serve exited: {self.log.read_text()[-3000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    self.start_seconds.append(time.monotonic() - self.started_at)
                    return
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"vLLM server not up in {timeout} s: {self.log.read_text()[-3000:]}"
            time.sleep(1)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL to the server and its engine process: a crash, or a node lost."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vllm-server")
    server = Server(directory, build_tiny_model("qwen2_vl", directory / "qwen2_vl"))
    yield server
    print(f"vLLM server starts (s): {[round(s) for s in server.start_seconds]}")
    if server.running():
        server.kill()


@pytest.fixture
def running_server(server) -> Server:
    if not server.running():
        server.start()
        server.wait_up()
    return server


def server_run(server: Server, output_dir: Path, **overrides):
    return vllm_config(
        output_dir,
        vllm_mode="server",
        vllm_server_host="127.0.0.1",
        vllm_server_port=server.port,
        vllm_weight_transport="files",
        **overrides,
    )


def test_a_restarted_server_gets_the_trained_weights_again_and_training_finishes(
    running_server, tmp_path, monkeypatch, caplog
):
    server = running_server
    model, processor = load_policy(server.recipe.parent / "qwen2_vl")
    args = server_run(server, tmp_path / "run", vllm_server_retry_timeout=300)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[CompletionLog()], args=args, train_dataset=rows(), processing_class=processor
    )
    # The server dies right after step 2's weights reached it, before its generation; a new one starts on the
    # same port, holding the base weights.
    sync_weights = VLMRollout.sync_weights
    starts = server.starts

    def sync_then_restart(rollout):
        sync_weights(rollout)
        if trainer.state.global_step == 1 and server.starts == starts:
            server.kill()
            server.start()

    monkeypatch.setattr(VLMRollout, "sync_weights", sync_then_restart)
    with caplog.at_level(logging.WARNING, logger="vlm_rl.rollout.server_retry"):
        trainer.train()
    assert server.starts == starts + 1 and trainer.state.global_step == 4
    # Step 2 was generated by the new server: with the trained weights, as the log-prob gap shows (without the
    # weights sent again it is 0.18-0.28 from step 2 on, see test_vllm.SYNCED_GAP).
    gaps = logp_gaps(trainer)
    assert len(gaps) == 4 and max(gaps) < SYNCED_GAP, gaps
    waits = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert waits and all(f"vLLM server at http://127.0.0.1:{server.port} unreachable" in w for w in waits)
    assert "answers again after" in caplog.text
    assert trainer.vllm_generation.server_retry.resyncs == 1


class KillServer(TrainerCallback):
    """SIGKILL the server after step 1, and note when."""

    def __init__(self, server: Server):
        self.server = server
        self.killed_at: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.server.kill()
            self.killed_at = time.monotonic()


def test_a_server_that_stays_away_stops_the_run_with_a_checkpoint_that_auto_resumes(running_server, tmp_path):
    server = running_server
    run = tmp_path / "run"
    model, processor = load_policy(server.recipe.parent / "qwen2_vl")
    args = server_run(server, run, vllm_server_retry_timeout=GIVE_UP_AFTER)
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[CompletionLog()], args=args, train_dataset=rows(), processing_class=processor
    )
    kill = KillServer(server)
    trainer.add_callback(kill)
    with pytest.raises(VLLMServerGone) as stopped:
        trainer.train()
    took = time.monotonic() - kill.killed_at
    print(f"stopped {took:.1f} s after the server was killed (vllm_server_retry_timeout={GIVE_UP_AFTER:g})")
    assert GIVE_UP_AFTER <= took < GIVE_UP_AFTER + STOP_MARGIN
    message = str(stopped.value)
    assert "\n" not in message
    url = f"http://127.0.0.1:{server.port}"
    assert f"The vLLM server at {url} did not answer for 8 s (vllm_server_retry_timeout: 8 s)" in message
    assert f"checkpoint saved in {run / 'checkpoint-1'}" in message
    assert "vlm-rl vllm-serve" in message and "--resume_from_checkpoint auto" in message
    assert latest_checkpoint(run) == run / "checkpoint-1"

    # The server back: the same run resumes from that checkpoint and finishes.
    server.start()
    server.wait_up()
    model, processor = load_policy(server.recipe.parent / "qwen2_vl")
    trainer = VLMGRPOTrainer(
        model=model, reward_funcs=[CompletionLog()], args=args, train_dataset=rows(), processing_class=processor
    )
    trainer.train(resume_from_checkpoint=resolve_resume("auto", run))
    assert trainer.state.global_step == 4
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]


# A reward that kills the server (SIGKILL to its process group) once step 1's completions are in: from then on,
# step 2's weight sync and generation find no server.
KILLING_REWARD = """
import os, signal, time
from pathlib import Path

def kill_server_once(completions, **kwargs):
    marker = Path(os.environ["VLM_RL_TEST_KILLED_AT"])
    if not marker.exists():
        try:
            os.killpg(int(os.environ["VLM_RL_TEST_SERVER_PGID"]), signal.SIGKILL)
        except ProcessLookupError:  # the other process killed it first
            pass
        marker.write_text(str(time.time()))
    return [float(len(completion[0]["content"])) for completion in completions]
"""


def test_two_processes_both_stop_with_a_checkpoint_when_the_server_stays_away(running_server, tmp_path):
    """Only the main process talks to the server; the other waits in TRL's broadcast of the completions. Both stop
    at the same point, with the message, and the checkpoint of step 1 is written by both."""
    from test_distributed import launch
    from test_distributed import write_recipe as write_two_process_recipe

    server = running_server
    (tmp_path / "kill_server.py").write_text(KILLING_REWARD)
    recipe = write_two_process_recipe(
        tmp_path,
        model_name_or_path=str(server.recipe.parent / "qwen2_vl"),
        max_pixels=MAX_PIXELS,
        reward_funcs=["accuracy", "kill_server.py:kill_server_once"],
        max_steps=4,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_host="127.0.0.1",
        vllm_server_port=server.port,
        vllm_weight_transport="files",
        vllm_max_model_length=512,
        vllm_server_retry_timeout=GIVE_UP_AFTER,
    )
    killed_at = tmp_path / "killed_at"
    os.environ["VLM_RL_TEST_SERVER_PGID"] = str(server.process.pid)
    os.environ["VLM_RL_TEST_KILLED_AT"] = str(killed_at)
    try:
        code, output = launch("cpu_ddp.yaml", recipe, timeout=240)
    finally:
        del os.environ["VLM_RL_TEST_SERVER_PGID"], os.environ["VLM_RL_TEST_KILLED_AT"]
    ended = time.time()
    assert code not in (0, None), output[-4000:]  # stopped, not hung
    server.process.wait(timeout=30)  # killed by the reward
    took = ended - float(killed_at.read_text())
    print(f"two processes exited {took:.1f} s after the server was killed (including the launcher's exit)")
    run = tmp_path / "run"
    lines = [line for line in output.splitlines() if line.startswith("vlm-rl train: error: The vLLM server")]
    assert len(lines) == 2, output[-4000:]  # one per process
    assert f"checkpoint saved in {run / 'checkpoint-1'}" in lines[0] and "did not answer for 8 s" in lines[0]
    assert latest_checkpoint(run) == run / "checkpoint-1"
    assert sorted(path.name for path in (run / "checkpoint-1").glob("rollout_state_*.pt")) == [
        "rollout_state_0.pt",
        "rollout_state_1.pt",
    ]
    assert took < GIVE_UP_AFTER + 2 * STOP_MARGIN
