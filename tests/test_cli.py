"""The command line: every subcommand answers --help; unbuilt ones refuse loudly, never fake."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

SUBCOMMANDS = ["synth", "adapt", "clips", "extract", "pretrain", "finetune", "evaluate", "sweep",
               "features", "stack", "demo"]


def vidray(*args):
    return subprocess.run([sys.executable, "-m", "vidray.jobs.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_subcommand():
    proc = vidray("--help")
    assert proc.returncode == 0
    for name in SUBCOMMANDS:
        assert f"    {name} " in proc.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name):
    proc = vidray(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: vidray {name}")


@pytest.mark.parametrize("args", [["extract"], ["finetune"], ["evaluate"], ["sweep"],
                                  ["features", "ls", "/tmp"], ["pretrain", "configs/demo/pretrain.yaml"]])
def test_unbuilt_subcommands_exit_nonzero_saying_so(args):
    proc = vidray(*args)
    assert proc.returncode == 3
    assert "not implemented yet" in proc.stderr
    assert proc.stdout == ""


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "vidray")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: vidray" in proc.stdout
