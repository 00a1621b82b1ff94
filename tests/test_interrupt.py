"""An interrupted command stops what it started: Ctrl-C and SIGTERM to a running `vidray demo`
(the local stack's S3 and MLflow servers, MLflow's job workers, the local Ray) and Ctrl-C while
`vidray stack up` waits for its servers. Real processes, real signals; nothing may survive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO
from vidray import stack as local_stack


def _start(stderr_path, *args: str) -> subprocess.Popen:
    # Its own session, as a terminal's foreground job is: Ctrl-C goes to its whole process group.
    # stderr to a file: Ray's log lines would fill a pipe nobody reads while stdout is followed.
    return subprocess.Popen([sys.executable, "-m", "vidray.jobs.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=open(stderr_path, "w"), text=True, start_new_session=True)


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _cmdline(p: psutil.Process) -> str:
    """A process's command line, or "" once it has exited (a child not yet reaped by its parent is
    a zombie: it has no command line left to read; a full run here failed on one)."""
    try:
        return " ".join(p.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return ""


def _survivors(processes: list[psutil.Process], within_s: float) -> list[str]:
    deadline = time.monotonic() + within_s
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.5)
    return [_cmdline(p)[:200] for p in alive if p.is_running()]


def _kill_all(processes: list[psutil.Process]) -> None:
    """Cleanup after a failed assertion: ours only, by pid."""
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_demo_leaves_no_process_behind(tmp_path, signum):
    err = tmp_path / "stderr.txt"
    demo = _start(err, "demo", "--workdir", str(tmp_path / "work"), "--videos", "6", "--quick")
    processes: list[psutil.Process] = []
    try:
        # Once the clips step runs, the stack and the local Ray (with its workers) are up.
        for line in demo.stdout:
            if "clips: Ray Data pipeline" in line:
                break
        else:
            pytest.fail(f"the demo ended before its clips step: {demo.wait()} {err.read_text()[-3000:]}")
        time.sleep(3)
        processes = _descendants(demo.pid)
        names = " ".join(_cmdline(p) for p in processes)
        assert "moto" in names and "mlflow" in names and "raylet" in names, names
        if signum == signal.SIGINT:
            os.killpg(demo.pid, signal.SIGINT)   # what a terminal's Ctrl-C does
        else:
            demo.send_signal(signal.SIGTERM)       # what `timeout` or a scheduler does
        code = demo.wait(timeout=120)
        stderr = err.read_text()
        assert code == 128 + signum, stderr[-3000:]
        assert ("terminated" if signum == signal.SIGTERM else "interrupted") in stderr
        assert _survivors(processes, within_s=30) == []
        assert local_stack.status(str(tmp_path / "work" / "stack")) == {}
    finally:
        if demo.poll() is None:
            demo.kill()
        _kill_all(processes)


def test_ctrl_c_while_stack_up_waits_stops_both_servers(tmp_path):
    directory = tmp_path / "stack"
    err = tmp_path / "stderr.txt"
    up = _start(err, "stack", "up", "--dir", str(directory))
    processes: list[psutil.Process] = []
    try:
        # The state file is written once both servers are spawned, before they answer.
        deadline = time.monotonic() + 60
        while not (directory / "stack.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        processes = _descendants(up.pid)
        assert len(processes) >= 2, "stack up did not spawn its servers"
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(timeout=60) == 130, err.read_text()[-3000:]
        assert _survivors(processes, within_s=30) == []
    finally:
        if up.poll() is None:
            up.kill()
        _kill_all(processes)
