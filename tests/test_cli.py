"""The command line: every subcommand answers --help; bad configs exit 2 naming the key."""

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
    if "YAML preset" in proc.stdout:   # config-taking subcommands give an example of their own kind
        from vidray.jobs.cli import PRESET_EXAMPLES

        assert PRESET_EXAMPLES[name].split("/")[-1] in " ".join(proc.stdout.split())


def test_version():
    import vidray as package

    proc = vidray("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"vidray {package.__version__}"


def test_sweep_without_a_search_space_says_what_to_add():
    proc = vidray("sweep")
    assert proc.returncode == 2 and "'space'" in proc.stderr and "objective.mmm_ratio" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("args, key", [(["finetune"], "data.features"), (["pretrain"], "data.features"),
                                       (["evaluate"], "checkpoint"), (["clips"], "manifest")])
def test_training_subcommands_name_the_missing_key_before_importing_the_job(args, key):
    """Said before torch is imported (seconds on a cold machine): the check is the config's."""
    code = ("import sys; from vidray.jobs.cli import main; rc = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"'{key}'" in proc.stderr and "is required" in proc.stderr
    assert proc.stdout.strip() == "no torch"


@pytest.mark.parametrize("command, keys", [("pretrain", ["data.features", "data.text"]),
                                           ("extract", ["manifest", "root"]), ("evaluate", ["checkpoint"])])
def test_print_config_works_before_the_required_values_are_set(command, keys):
    """Its keys can be discovered: the YAML (which loads back) and, marked, what is still to set."""
    import yaml

    proc = vidray(command, "--print-config")
    assert proc.returncode == 0, proc.stderr
    listed, trailer = proc.stdout.split("# still to set before it runs:\n")
    assert isinstance(yaml.safe_load(listed), dict)
    assert [line.split(":")[0].strip("# ") for line in trailer.splitlines()] == keys


def test_python_dash_m_vidray_jobs_is_the_same_command():
    """For a node where the console script is not on PATH (a job's shell, a bare venv)."""
    import vidray as package

    proc = subprocess.run([sys.executable, "-m", "vidray.jobs", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"vidray {package.__version__}"


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "vidray")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: vidray" in proc.stdout


def test_adapt_writes_a_manifest_and_reports_bad_rows(tmp_path):
    import pyarrow.parquet as pq

    csv = tmp_path / "webvid.csv"
    csv.write_text("videoid,contentUrl,duration,page_idx,page_dir,name\n"
                   "1001,http://x/1001.mp4,PT00H00M11S,1,dir_a,a dog runs on the beach\n"
                   "1002,http://x/1002.mp4,PT00H00M07S,1,dir_a,\n"
                   "1003,http://x/1003.mp4,PT00H00M05S,1,dir_b,a cat sleeps\n")
    out = tmp_path / "manifest.parquet"
    proc = vidray("adapt", "webvid", str(csv), "--videos", "s3://bucket/webvid", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"{csv}:3" in proc.stderr  # the row without a caption, by file and line
    table = pq.read_table(out).to_pylist()
    assert [r["video_id"] for r in table] == ["1001", "1003"]
    assert table[0]["uri"] == "s3://bucket/webvid/dir_a/1001.mp4"
    assert table[0]["duration_s"] == 11.0


def test_adapt_unknown_format_is_a_clear_error(tmp_path):
    proc = vidray("adapt", "kinetics", str(tmp_path / "x.csv"), "--videos", "/v", "--out", str(tmp_path / "m"))
    assert proc.returncode == 1
    assert "webvid" in proc.stderr and "kinetics" in proc.stderr


def test_synth_takes_config_overrides_and_the_asr_style(tmp_path):
    import pyarrow.parquet as pq

    proc = vidray("synth", "--help")
    assert "--style {clean,asr}" in proc.stdout and "style=asr" in proc.stdout
    out = tmp_path / "asr"
    proc = vidray("synth", str(out), "style=asr", "videos=2", "min_seconds=1", "max_seconds=1.5",
                  "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert '"qa": 0' in proc.stdout and '"coin_uri": null' in proc.stdout
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["video_id"] for r in rows] == ["asr-synth_000000", "asr-synth_000001"]
    assert not (out / "qa.jsonl").exists()
    proc = vidray("synth", str(tmp_path / "bad"), "style=howto")
    assert proc.returncode == 2 and "'style'" in proc.stderr
