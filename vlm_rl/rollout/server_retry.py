"""Riding out a vLLM server that goes away mid-run (`vllm_mode: server`): wait for it, re-sync it, or stop cleanly.

What TRL 1.16 does: `VLLMClient` mounts a `urllib3` retry policy on its HTTP session (5 connection and 5 read
retries, waits of 0, 4, 8, 16, 32 s, nothing logged), then raises. A POST whose connection dropped is re-sent as is,
so a restarted server (holding the model's *base* weights) answers generation requests with a policy the trainer
left behind, silently; a server that stays away ends the run with a traceback on the main process while the other
processes wait for it in the next collective, and no checkpoint.

What changes (`ServerRetry`, wired into `VLMClient` and the file weight sync in `vlm_rl.rollout.vllm`):

- connection and read failures are not retried by the session; `ServerRetry.call` retries them for
  `vllm_server_retry_timeout` seconds, with a doubling wait (1 s up to 30 s) and one log line per wait;
- before a request is sent again, the server gets the policy's weights again in full (`resync`: the last synced
  `model.safetensors` is reloaded), so every generation after an outage comes from the trained weights; with
  `vllm_weight_transport: nccl` that cannot be done from inside a step, and a server that comes back is given up on;
- when the server is not back in time, the call returns a stand-in value instead of raising, so that the main
  process still takes part in the collective the other processes wait in; every process then raises
  `VLLMServerGone`, and the trainer saves a checkpoint before stopping with the message
  (`vlm_rl.trainers.checkpointing`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from vlm_rl.errors import RunStopped, first_line

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_WAIT = 1.0  # seconds before the first retry; doubled after each, up to MAX_WAIT
MAX_WAIT = 30.0
# Failures that say the server is not there (refused, reset, dropped mid-answer, DNS), not that a request is wrong.
UNREACHABLE = (requests.ConnectionError, requests.Timeout)


class VLLMServerGone(RunStopped):
    """The vLLM server was given up on (`ServerRetry`); raised on every process, then again by the trainer with the
    checkpoint it saved."""

    def __init__(self, reason: str, checkpoint: Path | None = None) -> None:
        self.reason = reason
        saved = f"; checkpoint saved in {checkpoint}" if checkpoint is not None else ""
        super().__init__(
            f"{reason}{saved}. Start the server again (`vlm-rl vllm-serve --config <the same recipe>`), then run the "
            "same command with --resume_from_checkpoint auto."
        )


def session_without_connection_retries(session: requests.Session, pool_size: int) -> None:
    """Keep TRL's retries of 500/502/503 answers on `session`, but let connection and read failures through to
    `ServerRetry`, which re-syncs the weights before anything is sent again."""
    policy = Retry(
        total=3,
        connect=0,
        read=0,
        status=3,
        status_forcelist=[500, 502, 503],
        backoff_factor=2,
        allowed_methods=["POST", "GET"],
    )
    adapter = HTTPAdapter(max_retries=policy, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)


class ServerRetry:
    """Retries calls to one vLLM server through an outage of up to `timeout` seconds (see the module docstring).

    `resync` sends the policy's current weights to a server that answers again (None: it cannot be done from here,
    and a server that comes back is given up on as if it had not). `resyncs` counts the times it ran.
    """

    def __init__(self, base_url: str, timeout: float, resync: Callable[[], None] | None) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.resync = resync
        self.resyncs = 0
        self.gone: VLLMServerGone | None = None  # set once the server is given up on; every later call skips

    def call(self, what: str, func: Callable[..., T], *args: Any, stand_in: T, **kwargs: Any) -> T:
        """`func(*args, **kwargs)`, retried while the server is unreachable; `stand_in` once it is given up on."""
        if self.gone is not None:
            return stand_in
        outage_start: float | None = None
        error: BaseException | None = None
        wait = FIRST_WAIT
        while True:
            if error is not None and self.resync is None and self._answers():
                # Back, but the weights cannot be sent from here: it would generate from the base weights.
                return self._give_up(time.monotonic() - outage_start, error, came_back=True, stand_in=stand_in)
            try:
                if error is not None and self.resync is not None:
                    self.resync()  # the server may be a new process, holding the model's base weights
                    self.resyncs += 1
                result = func(*args, **kwargs)
            except UNREACHABLE as raised:
                error = raised
                now = time.monotonic()
                outage_start = outage_start if outage_start is not None else now
                left = outage_start + self.timeout - now
                if left <= 0:
                    return self._give_up(now - outage_start, error, came_back=False, stand_in=stand_in)
                delay = min(wait, left)
                logger.warning(
                    "vLLM server at %s unreachable (%s: %s); retrying %s in %.0f s (giving up in %.0f s, "
                    "vllm_server_retry_timeout=%g).",
                    self.base_url, what, type(error).__name__, what, delay, left, self.timeout,
                )  # fmt: skip
                time.sleep(delay)
                wait = min(2 * wait, MAX_WAIT)
                continue
            if outage_start is not None:
                logger.warning(
                    "vLLM server at %s answers again after %.0f s; the policy's weights were sent to it again.",
                    self.base_url,
                    time.monotonic() - outage_start,
                )
            return result

    def _give_up(self, waited: float, error: BaseException, came_back: bool, stand_in: T) -> T:
        if came_back:
            why = (
                "came back after an outage, and the weights cannot be sent to it again from inside a step over "
                "vllm_weight_transport: nccl"
            )
        else:
            why = f"did not answer for {waited:.0f} s (vllm_server_retry_timeout: {self.timeout:g} s)"
        self.gone = VLLMServerGone(
            f"The vLLM server at {self.base_url} {why}; last error: {type(error).__name__}: {first_line(error)[:200]}"
        )
        logger.error("%s.", self.gone.reason)
        return stand_in

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.base_url}/health", timeout=5).status_code == 200
        except UNREACHABLE:
            return False
