"""A job's notes for its driver: what its workers must tell the user (storage or MLflow not
answering, where training starts) while Ray keeps their logs off the driver
(:func:`vidray.cluster.init_ray`). A leaf module: storage and the training loop call :func:`note`.
"""

from __future__ import annotations

import sys
import threading
import time


# True in a driver (a process that started or joined Ray through vidray.cluster.init_ray).
_driver = False


def in_driver() -> None:
    global _driver
    _driver = True


class Notes:
    """A job's notes for its driver (an actor): what its workers must tell the user (storage or
    MLflow not answering, where training starts) while their logs stay off the driver."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def _notes_name() -> str:
    import ray

    return f"vidray-notes-{ray.get_runtime_context().get_job_id()}"


def start() -> None:
    """The job's :class:`Notes` actor, and a thread printing what arrives on this driver's stderr."""
    import ray

    notes = ray.remote(num_cpus=0)(Notes).options(name=_notes_name()).remote()

    def show() -> None:
        while ray.is_initialized():
            try:
                lines = ray.get(notes.take.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - Ray shutting down, or slow: the next round tells
                lines = []
            for line in lines:
                print(f"[vidray] {line}", file=sys.stderr, flush=True)
            time.sleep(1.0)

    threading.Thread(target=show, name="vidray-notes", daemon=True).start()


def note(message: str) -> None:
    """Tell the user ``message``: on this process's stderr (a worker's log file) and, from a
    worker of a job whose driver keeps Ray's worker logs to itself, on the driver's too."""
    print(f"[vidray] {message}", file=sys.stderr, flush=True)
    if _driver or "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized():
        return
    try:
        ray.get_actor(_notes_name()).add.remote(message)
    except ValueError:  # no notes: --verbose (the worker's stderr reaches the driver) or not a vidray job
        pass
