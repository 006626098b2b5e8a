"""A bound on every training step: a stuck step ends the run with a stack dump and the ranks that stopped answering.

A collective waits for a lost peer until `ddp_timeout` (half an hour by default) and then fails without saying which
peer or where; a step stuck outside any collective (a reward, a data worker, a stalled file system) waits forever.
`StepTimeout` is a watchdog thread per process, re-armed at each step's begin and end. When no step boundary comes
for `step_timeout` seconds it dumps every thread's stack, logs one line naming the step, the ranks that stopped
answering and the last complete checkpoint, and exits with `EXIT_CODE` (`os._exit`: the main thread is stuck).

Ranks are told apart by heartbeats that need no collective: each watchdog rewrites a small file under
`<output_dir>/.step_timeout/` every `interval` seconds (one host, or several sharing the output directory). A rank
whose heartbeat does not advance while the timed-out one watches it has stopped answering: killed, SIGSTOPped,
its host gone or its file system stalled. A rank that gives up leaves a marker there, and every other rank's
watchdog, alive but waiting for it, then dumps its own stack and exits too.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from accelerate.utils import broadcast_object_list
from transformers import Trainer, TrainerCallback

from vlm_rl.checkpoints import latest_checkpoint

logger = logging.getLogger(__name__)

EXIT_CODE = 124  # as `timeout(1)` exits when its command runs past the limit
HEARTBEAT_DIR = ".step_timeout"
EXPIRED = "expired.json"


def heartbeat_interval(timeout: float) -> float:
    """Seconds between heartbeats: a tenth of the timeout, between 0.5 and 10 s (a file write per rank per interval
    is no load on a shared file system, and the report after a timeout takes about three intervals)."""
    return min(max(timeout / 10, 0.5), 10.0)


class StepTimeout(TrainerCallback):
    """The watchdog of one process; `watching` starts it around `trainer.train` and always stops it."""

    def __init__(self, timeout: float, output_dir: str | Path, rank: int = 0, world_size: int = 1, run_id: str = ""):
        self.timeout = timeout
        self.interval = heartbeat_interval(timeout)
        self.rank, self.world_size, self.run_id = rank, world_size, run_id
        self.output_dir = Path(output_dir)
        self.heartbeats = self.output_dir / HEARTBEAT_DIR
        self._what = "the start of training (resuming, loading the first batch)"
        self._deadline = time.monotonic() + timeout
        self._beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vlm-rl step_timeout", daemon=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._arm(f"step {state.global_step + 1}")

    def on_step_end(self, args, state, control, **kwargs):
        self._arm(f"the work after step {state.global_step} (logging, saving, evaluating, loading the next batch)")

    def _arm(self, what: str) -> None:
        self._what = what
        self._deadline = time.monotonic() + self.timeout

    def start(self) -> None:
        self._arm(self._what)
        if self.world_size > 1:
            self.heartbeats.mkdir(parents=True, exist_ok=True)
            self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.world_size > 1:
            with contextlib.suppress(OSError):
                (self.heartbeats / f"rank-{self.rank}.json").unlink()
                self.heartbeats.rmdir()  # the last rank to leave: nothing is left in output_dir

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if self.world_size > 1:
                self._beat()
                peer = self._expired_peer()
                if peer is not None:
                    self._exit(
                        f"step_timeout: rank {peer['rank']} gave up on {peer['what']}; rank {self.rank} stops too, "
                        f"while in {self._what}"
                    )
            if time.monotonic() > self._deadline:
                self._expire()

    def _beat(self) -> None:
        """Rewrite this rank's heartbeat (write, then rename: a reader never sees half a file)."""
        self._beats += 1
        path = self.heartbeats / f"rank-{self.rank}.json"
        with contextlib.suppress(OSError):  # a full or stalled disk: the heartbeat stops, peers see that
            path.with_suffix(".tmp").write_text(json.dumps({"run": self.run_id, "beats": self._beats}))
            path.with_suffix(".tmp").replace(path)

    def _read(self, name: str) -> dict | None:
        """A heartbeat or marker file of this run, or None (missing, unreadable, or a previous run's)."""
        try:
            record = json.loads((self.heartbeats / name).read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("run") == self.run_id else None

    def _expired_peer(self) -> dict | None:
        record = self._read(EXPIRED)
        return record if record is not None and record["rank"] != self.rank else None

    def _silent_ranks(self) -> tuple[list[int], list[int]]:
        """The ranks whose heartbeat does not advance over three intervals while this one keeps beating, and those
        whose heartbeat this process cannot see at all (an output directory not shared between nodes)."""
        before = {rank: self._read(f"rank-{rank}.json") for rank in range(self.world_size)}
        for _ in range(3):
            time.sleep(self.interval)
            self._beat()
        after = {rank: self._read(f"rank-{rank}.json") for rank in range(self.world_size)}
        gave_up = self._read(EXPIRED)
        peers = [rank for rank in range(self.world_size) if rank != self.rank]
        unseen = [rank for rank in peers if before[rank] is None and after[rank] is None]
        silent = [
            rank
            for rank in peers
            if rank not in unseen and after[rank] == before[rank] and (gave_up is None or gave_up["rank"] != rank)
        ]
        return silent, unseen

    def _expire(self) -> None:
        # A backstop if the report below hangs too (its file reads on a stalled file system): dump and exit anyway.
        faulthandler.dump_traceback_later(4 * self.interval + 60, exit=True)
        message = f"step_timeout: {self._what} did not finish within {self.timeout:g} s on rank {self.rank}"
        if self.world_size > 1:
            silent, unseen = self._silent_ranks()
            if silent:
                message += f"; ranks that stopped answering: {silent}"
            elif not unseen:
                message += "; every rank still answers (a step stuck in code on some rank: see the stack dumps)"
            if unseen:
                message += f"; ranks with no heartbeat in {self.heartbeats} (output_dir not shared?): {unseen}"
            with contextlib.suppress(OSError):
                record = {"run": self.run_id, "rank": self.rank, "what": self._what}
                (self.heartbeats / EXPIRED).write_text(json.dumps(record))
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is None:
            message += f"; there is no complete checkpoint in {self.output_dir} (a rerun starts from the beginning)"
        else:
            message += (
                f"; the last complete checkpoint is {checkpoint} (run the same command with "
                "--resume_from_checkpoint auto to continue)"
            )
        self._exit(message)

    def _exit(self, message: str) -> None:
        logger.error("%s. Stack of every thread of rank %d follows.", message, self.rank)
        for handler in logging.getLogger().handlers + logger.handlers:
            handler.flush()
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_CODE)


@contextlib.contextmanager
def watching(trainer: Trainer, timeout: float | None) -> Iterator[None]:
    """Run the block (`trainer.train`) under a `StepTimeout` of `timeout` seconds; None or 0: no watchdog.

    The watchdog is stopped however the block ends, so an exception from training never leaves it armed."""
    if not timeout or timeout <= 0:
        yield
        return
    args = trainer.args
    run_id = [secrets.token_hex(8)]
    if args.world_size > 1:
        broadcast_object_list(run_id)  # rank 0's, so that no rank reads a previous run's files as this run's
    watchdog = StepTimeout(timeout, args.output_dir, args.process_index, args.world_size, run_id[0])
    trainer.add_callback(watchdog)
    watchdog.start()
    try:
        yield
    finally:
        watchdog.stop()
        trainer.remove_callback(watchdog)
