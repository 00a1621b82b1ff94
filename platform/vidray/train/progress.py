"""One live progress line per training job, on the driver.

Rank 0 posts each optimizer step to a small actor; a thread in the driver reads it and shows a
tqdm bar on a terminal, or a plain line every ``VIDRAY_PROGRESS_S`` seconds (default 15) in a
pipe, a log file or a submitted job: no cursor codes, one line per update.

Why an actor rather than the workers' own prints: Ray's worker logs stay off the driver by
default (:func:`vidray.cluster.init_ray`; they are Ray Train's, Ray Data's and Ray's own
chatter), and forwarded lines come prefixed, deduplicated at random and twice in a job's log.
(What a worker must say besides its progress goes through :func:`vidray.notes.note`.)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO


class Board:
    """The latest step of one run, posted by its rank 0."""

    def __init__(self) -> None:
        self.state: dict = {}

    def post(self, state: dict) -> None:
        self.state = state

    def read(self) -> dict:
        return self.state


def progress_interval() -> float:
    return float(os.environ.get("VIDRAY_PROGRESS_S", "15"))


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Rate:
    """Steps per second as the driver sees them, from the first step it saw (a resumed run's
    first step is not its step 1)."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None

    def eta(self, step: int, total: int, now: float) -> float | None:
        if self.first is None:
            self.first = (step, now)
            return None
        done, elapsed = step - self.first[0], now - self.first[1]
        return (total - step) * elapsed / done if done > 0 and elapsed > 0 else None


def progress_line(label: str, state: dict, total: int, eta: float | None) -> str:
    step = state["step"]
    return (f"{label}: step {step}/{total} ({step / total:.0%}) loss {state['loss']:.4f} "
            f"{state['examples_per_s']:.1f} examples/s ETA {clock(eta) if eta is not None else '?'}")


def _watch(board, label: str, total: int, stop: threading.Event, stream: TextIO) -> None:
    import ray

    bar = None
    if stream.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, unit="step", file=stream, dynamic_ncols=True)
    rate, shown, last_print = Rate(), None, float("-inf")
    while True:
        stopping = stop.wait(1.0)
        try:
            state = ray.get(board.read.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a slow or gone actor must not end the job; try again
            state = {}
        if state and state["step"] != shown:
            now = time.monotonic()
            eta = rate.eta(state["step"], total, now)
            if bar is not None:
                bar.update(state["step"] - bar.n)
                bar.set_postfix(loss=f"{state['loss']:.4f}", ex_s=f"{state['examples_per_s']:.1f}")
            elif shown is None or stopping or state["step"] == total or now - last_print >= progress_interval():
                print(progress_line(label, state, total, eta), file=stream, flush=True)
                last_print = now
            shown = state["step"]
        if stopping:
            break
    if bar is not None:
        bar.close()


@contextmanager
def live_progress(label: str, total: int, stream: TextIO | None = None) -> Iterator:
    """A :class:`Board` actor for rank 0 to post to, shown on ``stream`` (stderr: stdout holds
    the job's JSON report) until the block ends; the last state is shown before it returns."""
    import ray

    board = ray.remote(num_cpus=0)(Board).remote()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(board, label, total, stop, stream or sys.stderr),
                               name="vidray-progress", daemon=True)
    watcher.start()
    try:
        yield board
    finally:
        stop.set()
        watcher.join(35)
        ray.kill(board)
