"""A judge server that is down for a whole training step, then hung for one, then back: training goes on, each
step's failures are counted as they happened, and scoring resumes in full once the server answers again.

The judge is a real HTTP server on 127.0.0.1 (`test_rewards_judge.JudgeServer`), stopped and started again on the
same port between steps.
"""

from __future__ import annotations

import threading

import pytest
from conftest import no_hang, shapes_trainer
from test_rewards_judge import KEY_ENV, JudgeServer, use_local_judge
from transformers import TrainerCallback

from vlm_rl.rewards import ConfiguredReward
from vlm_rl.rewards.judge import llm_judge

SAMPLES = 4  # completions per step: 2 prompts x 2 generations


class Judge:
    """A judge server that the test can take down and bring back on the same port."""

    def __init__(self) -> None:
        self.server = self._serve(0)
        self.port = self.server.server_address[1]
        self.served: list[int] = []  # requests answered by each server started, in order

    @staticmethod
    def _serve(port: int) -> JudgeServer:
        server = JudgeServer(port)
        server.reply = lambda payload: "Close enough.\nSCORE: 7"  # the shapes' colours are not the grader's
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return server

    def stop(self) -> None:
        """Close the listening socket: requests are refused, as from a judge that crashed."""
        self.served.append(len(self.server.bodies))
        self.server.stop.set()
        self.server.shutdown()
        self.server.server_close()

    def start(self, delay: float = 0.0) -> None:
        self.server = self._serve(self.port)
        self.server.delay = delay


class Outage(TrainerCallback):
    """After step 1 the judge goes down; after step 2 it comes back hung (answers after its time-out); after step 3
    it answers again."""

    def __init__(self, judge: Judge):
        self.judge = judge

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.judge.stop()
        elif state.global_step == 2:
            self.judge.start(delay=5.0)
        elif state.global_step == 3:
            self.judge.stop()
            self.judge.start()


@pytest.fixture
def judge(monkeypatch):
    use_local_judge(monkeypatch)
    judge = Judge()
    yield judge
    judge.stop()


def test_a_judge_down_for_a_step_then_hung_then_back(load_tiny, tmp_path, judge):
    model, processor = load_tiny("qwen2_vl")
    settings = {
        "base_url": f"http://127.0.0.1:{judge.port}/v1",
        "model": "judge",
        "api_key_env": KEY_ENV,
        "timeout": 0.2,
        "max_retries": 1,
        "retry_backoff": 0.01,
    }
    reward = ConfiguredReward(llm_judge, name="llm_judge", kwargs=settings)
    trainer = shapes_trainer(model, processor, tmp_path, reward_funcs=[reward], max_steps=4)
    trainer.add_callback(Outage(judge))
    with no_hang(120):
        trainer.train()
    assert trainer.state.global_step == 4  # training went on through the outage
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4]
    # Samples scored per step: all, none while down, none while hung, all again.
    assert [entry["rewards/llm_judge/count"] for entry in steps] == [SAMPLES, 0, 0, SAMPLES]
    means = [entry["rewards/llm_judge/mean"] for entry in steps if entry["rewards/llm_judge/count"]]
    assert means == pytest.approx([0.7, 0.7])  # the judge's 7 of 10
    # Failures are running totals: each sample of step 2 refused (an error), each of step 3 timed out (an error
    # from the judge's own time-out), and none after the server is back.
    totals = [0, SAMPLES, 2 * SAMPLES, 2 * SAMPLES]
    assert [entry["rewards/llm_judge/failures"] for entry in steps] == totals
    assert [entry.get("rewards/llm_judge/failures_error", 0) for entry in steps] == totals
    assert trainer.reward_failures["llm_judge"] == {"error": 2 * SAMPLES, "timeout": 0, "nonfinite": 0}
    # The first server judged step 1's samples; the one started after the outage judged step 4's.
    assert judge.served[0] == SAMPLES and len(judge.server.bodies) == SAMPLES
