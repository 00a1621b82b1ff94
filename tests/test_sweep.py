"""`vidray sweep`: search spaces checked against the schemas, Ray Tune over the real pre-training,
ASHA, a failing trial that does not stop the sweep, kill + `--resume`, nested MLflow runs, and the
MLflow UI (headless Chromium) showing them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO
from vidray.config import ConfigError, load_config
from vidray.config.train import PretrainConfig
from vidray.tuning.report import best_row, format_table, tied_with, trial_rows
from vidray.tuning.space import check, trial_configs
from vidray.tuning.sweep import concurrency, load_sweep


def _write(tmp_path, data: dict) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


BASE = {"pretrain": {"model": {"flavour": "tiny"}, "train": {"steps": 30, "val_every": 10}},
        "space": {"objective.mmm_ratio": {"grid": [0.0, 0.5]}}}


# --- the config, without Ray -----------------------------------------------------------------

def _sweep(*overrides: str):
    return load_sweep(None, ["pretrain.train.val_every=10", *overrides])


def test_space_paths_and_entries_are_checked_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"space.objective.mmm_ratoi.*did you mean 'objective.mmm_ratio'"):
        check(_sweep("space.objective.mmm_ratoi={grid: [0.1]}"))
    for spec in ("{grid: []}", "{uniform: [0.5, 0.1]}", "{loguniform: [0, 1]}", "{range: [1, 2]}", "0.3"):
        with pytest.raises(ConfigError, match="space.objective.mmm_ratio"):
            check(_sweep(f"space.objective.mmm_ratio={spec}"))
    with pytest.raises(ConfigError, match="no finetune: stage"):
        check(_sweep("space.finetune.optim.lr={grid: [0.001]}"))
    # A value the schema rejects fails only its own trial: reported up front, not fatal.
    problems = check(_sweep("space.objective.mmm_ratio={grid: [0.3, 1.5]}"))
    assert len(problems) == 1 and "1.5" in problems[0] and "pretrain.objective.mmm_ratio" in problems[0]


def test_sweep_level_rules_name_the_key():
    space = "space.objective.mmm_ratio={grid: [0.1]}"
    cases = {"metric": [space, "pretrain.train.val_every=10", "metric=t2v_R1"],  # needs finetune:
             "scheduler.metric": [space, "pretrain.train.val_every=10", "scheduler.metric=t2v_R1"],
             "pretrain.train.val_every": [space],                  # val_loss needs validation
             "space": ["pretrain.train.val_every=10"]}
    for key, overrides in cases.items():
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_sweep(None, overrides)


def test_space_overrides_keep_dotted_paths_whole_and_the_name_is_stable(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_sweep(path, ["space.objective.mlm_prob={uniform: [0.1, 0.3]}"])
    assert cfg.space == {"objective.mmm_ratio": {"grid": [0.0, 0.5]},
                         "objective.mlm_prob": {"uniform": [0.1, 0.3]}}
    assert cfg.name.startswith("sweep-") and cfg.name == load_sweep(path, ["space.objective.mlm_prob="
                                                                          "{uniform: [0.1, 0.3]}"]).name
    assert load_sweep(path, []).name != cfg.name
    assert load_sweep(path, ["name=mine"]).name == "mine"


def test_trial_configs_apply_values_bundles_and_what_the_sweep_forces(tmp_path):
    cfg = load_sweep(_write(tmp_path, {**BASE, "finetune": {"task": "retrieval"}}),
                     ["pretrain.data.text=s3://b/text/v-1", "pretrain.data.features=s3://b/s3d/v-1"])
    params = {"objective.mmm_ratio": 0.3, "finetune.optim.lr": 1e-4,
              "tokenizer": {"model.text_backbone": "/models/minilm", "data.text": "s3://b/text/v-2"}}
    forced = {"pretrain": {"train": {"run_name": "s-t1"}}, "finetune": {"train": {"run_name": "s-t1-ft"}}}
    pretrain, finetune = trial_configs(cfg, params, forced)
    assert pretrain.objective.mmm_ratio == 0.3 and pretrain.model.text_backbone == "/models/minilm"
    assert pretrain.data.text == "s3://b/text/v-2" and pretrain.train.run_name == "s-t1"
    assert finetune.optim.lr == 1e-4 and finetune.model == pretrain.model      # same architecture
    assert finetune.data.text == "s3://b/text/v-2" and finetune.data.features == "s3://b/s3d/v-1"
    assert finetune.train.run_name == "s-t1-ft"
    with pytest.raises(ConfigError, match="pretrain.objective.mmm_ratio"):
        trial_configs(cfg, {"objective.mmm_ratio": 2.0}, forced)


def test_concurrency_follows_the_cluster_resources():
    cfg = load_sweep(None, ["space.objective.mmm_ratio={grid: [0.1]}", "metric=loss", "pretrain.train.num_workers=2"])
    assert concurrency(cfg, {"CPU": 4}) == 1    # trial + 2 workers, one CPU left for Ray Data
    assert concurrency(cfg, {"CPU": 16}) == 5
    assert concurrency(cfg, {"CPU": 2}) == 1    # never zero: the trial waits for resources
    gpu = load_sweep(None, ["space.objective.mmm_ratio={grid: [0.1]}", "metric=loss",
                            "pretrain.train.num_workers=2", "pretrain.train.use_gpu=true"])
    assert concurrency(gpu, {"CPU": 64, "GPU": 4}) == 2
    assert concurrency(load_sweep(None, ["space.objective.mmm_ratio={grid: [0.1]}", "metric=loss",
                                         "max_concurrent_trials=3"]), {"CPU": 4}) == 3


def test_best_trial_is_a_finished_one_and_the_table_shows_every_trial():
    cfg = load_sweep(None, ["space.objective.mmm_ratio={grid: [0.1]}", "metric=loss", "mode=min"])
    rows = [{"trial": "a", "objective.mmm_ratio": 0.0, "loss": 3.0, "steps": 30, "status": "done", "error": ""},
            {"trial": "b", "objective.mmm_ratio": 0.5, "loss": 1.0, "steps": 10, "status": "stopped", "error": ""},
            {"trial": "c", "objective.mmm_ratio": 0.7, "loss": None, "steps": 0, "status": "failed", "error": "boom"},
            {"trial": "d", "objective.mmm_ratio": 0.3, "loss": 2.5, "steps": 30, "status": "done", "error": ""}]
    assert best_row(cfg, rows)["trial"] == "d"          # b is lower, but was stopped early
    assert tied_with(cfg, rows, best_row(cfg, rows)) == []
    tie = [*rows, {**rows[3], "trial": "e"}, {**rows[1], "loss": 2.5}]   # e ties with d; a stopped one does not
    assert best_row(cfg, tie)["trial"] == "d" and tied_with(cfg, tie, best_row(cfg, tie)) == ["e"]
    assert best_row(load_sweep(None, ["space.objective.mmm_ratio={grid: [0.1]}", "metric=loss",
                                      "mode=max"]), rows)["trial"] == "a"
    lines = format_table(cfg, rows).splitlines()
    assert lines[0].split() == ["trial", "objective.mmm_ratio", "loss", "steps", "status", "error"]
    assert len(lines) == 5 and lines[3].split()[2] == "-" and lines[3].endswith("boom")


def test_a_trial_that_failed_before_reporting_keeps_its_values_in_the_table(tmp_path):
    """Tune's Result of such a trial, after ``--resume``, has ``config=None`` and no metrics (seen
    in a real resumed sweep); the values come from the trial folder's params.json instead."""
    cfg = load_sweep(None, ["space.objective.mmm_ratio={grid: [0.0, 0.3]}", "metric=loss"])
    trial_dir = tmp_path / "run_trial_0000_objective_mmm_ratio=0.0000"
    trial_dir.mkdir()
    (trial_dir / "params.json").write_text('{"objective.mmm_ratio": 0.0}')
    failed = SimpleNamespace(metrics=None, config=None, error=RuntimeError("import failed"), path=str(trial_dir))
    done = SimpleNamespace(metrics={"trial_id": "b", "loss": 1.5, "step": 30, "trial_done": 1},
                           config={"objective.mmm_ratio": 0.3}, error=None, path=str(tmp_path / "b"))
    rows = trial_rows(cfg, [failed, done], {})
    assert [(r["objective.mmm_ratio"], r["status"]) for r in rows] == [(0.3, "done"), (0.0, "failed")]
    assert rows[1]["error"] == "import failed" and rows[1]["steps"] == 0


def test_cli_rejects_a_bad_space_before_starting_ray():
    proc = subprocess.run([sys.executable, "-m", "vidray.jobs.cli", "sweep",
                           "space.objective.mmm_ratoi={grid: [0.1]}", "pretrain.train.val_every=10"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "space.objective.mmm_ratoi" in proc.stderr and "Ray" not in proc.stderr


# --- real sweeps -------------------------------------------------------------------------------

def _sweep_data(feature_sets, tmp_path, stack, name: str, experiment: str, **top) -> dict:
    return {
        "name": name, "storage_path": str(tmp_path / "sweeps"), "max_concurrent_trials": 1,
        "mlflow": {"tracking_uri": stack.env["MLFLOW_TRACKING_URI"], "experiment": experiment},
        "pretrain": {
            "model": {"flavour": "tiny"},
            "data": {"features": feature_sets["s3d"], "text": feature_sets["text"],
                     "manifest": feature_sets["manifest"], "clips_per_video": 16},
            "optim": {"lr": 1e-3, "warmup_steps": 5},
            "train": {"steps": 30, "batch_size": 8, "num_workers": 1, "checkpoint_every": 10,
                      "val_every": 10, "log_every": 10}},
        **top}


def _runs(stack, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    parents = [r for r in runs if r.data.tags.get("job") == "sweep"]
    children = [r for r in runs if parents and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents, children


def _finished_trials(path) -> int:
    """Trials Tune's last saved experiment state records as finished (0 while none is saved)."""
    from ray.tune import ExperimentAnalysis

    try:
        return sum(t.status == "TERMINATED" for t in ExperimentAnalysis(str(path)).trials)
    except Exception:  # not written yet, or caught mid-write
        return 0


@pytest.mark.heavy
def test_mmm_sweep_killed_then_resumed_runs_every_trial_exactly_once(feature_sets, tmp_path, stack, ray_cluster):
    experiment = "test-sweep-mmm"
    config = _write(tmp_path, _sweep_data(
        feature_sets, tmp_path, stack, "mmm", experiment,
        space={"objective.mmm_ratio": {"grid": [0.0, 0.5, 0.7]}},
        scheduler={"name": "none"}))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "vidray.jobs.cli", "sweep", config]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        # Kill the whole sweep (driver and all) once Tune's saved state holds two finished trials.
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and first.poll() is None:
            if _finished_trials(tmp_path / "sweeps" / "mmm") >= 2:
                break
            time.sleep(0.5)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    _, _, before = _runs(stack, experiment)
    finished_before = {c.info.run_id: c.info.end_time for c in before if c.info.status == "FINISHED"}
    assert len(finished_before) >= 2

    second = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming" in second.stderr
    try:
        report = json.loads(second.stdout)  # logs go to stderr: stdout holds the report alone
    except json.JSONDecodeError:
        pytest.fail("stdout is not the JSON report alone:\n" + second.stdout[:3000])
    assert [t["status"] for t in report["trials"]] == ["done"] * 3
    client, parents, children = _runs(stack, experiment)
    assert len(parents) == 1 and len(children) == 3
    assert sorted(float(c.data.params["objective.mmm_ratio"]) for c in children) == [0.0, 0.5, 0.7]
    for child in children:
        assert child.info.status == "FINISHED" and "val_loss" in child.data.metrics
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(set(steps)) == list(range(1, 31))                     # nothing lost
        if child.info.run_id in finished_before:                            # ... nor redone
            assert child.info.end_time == finished_before[child.info.run_id]
            assert sorted(steps) == list(range(1, 31))
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_done"] == 3
    assert parent.data.tags["best_trial"] == report["best"]["trial"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/trials.json", "report/trials.txt", "report/val_loss_vs_params.png"} <= artifacts
    # The UI's table would show a dotted column blank: the swept key is written with a slash.
    table = json.loads(open(client.download_artifacts(parent.info.run_id, "report/trials.json", str(tmp_path))).read())
    assert "objective/mmm_ratio" in table["columns"] and not any("." in c for c in table["columns"])
    best = client.download_artifacts(parent.info.run_id, "best_config.yaml", str(tmp_path))
    best_cfg = load_config(PretrainConfig, best)
    assert best_cfg.objective.mmm_ratio == report["best"]["objective.mmm_ratio"]


@pytest.fixture(scope="module")
def asha_sweep(feature_sets, tmp_path_factory, stack, ray_cluster):
    """A learning-rate sweep run in this process: a good rate, one too small to learn (ASHA stops
    it at the first rung) and an invalid one (its trial fails; the sweep goes on)."""
    from vidray.config import from_dict
    from vidray.tuning.config import SweepConfig
    from vidray.tuning.sweep import run_sweep

    tmp_path = tmp_path_factory.mktemp("asha")
    cfg = from_dict(SweepConfig, _sweep_data(
        feature_sets, tmp_path, stack, "asha-lr", "test-sweep-asha",
        space={"optim.lr": {"grid": [1e-3, 1e-7, -1.0]}},
        scheduler={"name": "asha", "grace_period": 10, "reduction_factor": 2}))
    lines: list[str] = []
    report = run_sweep(cfg, say=lines.append)
    return cfg, report, "\n".join(lines)


@pytest.mark.heavy
def test_asha_stops_a_lagging_trial_and_a_bad_value_fails_only_its_trial(asha_sweep, stack):
    cfg, report, said = asha_sweep
    by_lr = {t["optim.lr"]: t for t in report["trials"]}
    assert by_lr[1e-3]["status"] == "done" and by_lr[1e-3]["steps"] == 30
    assert by_lr[1e-7]["status"] == "stopped" and by_lr[1e-7]["steps"] < 30
    assert by_lr[-1.0]["status"] == "failed" and "optim.lr" in by_lr[-1.0]["error"]
    assert report["best"]["optim.lr"] == 1e-3
    assert "warning: optim.lr=-1.0" in said and "1 done, 1 stopped early, 1 failed" in said
    client, parents, children = _runs(stack, "test-sweep-asha")
    assert len(parents) == 1 and len(children) == 3
    child = {float(c.data.params["optim.lr"]): c for c in children}
    assert child[-1.0].info.status == "FAILED" and "optim.lr" in child[-1.0].data.tags["vidray.error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(child[-1.0].info.run_id)}
    assert child[1e-7].info.status == "KILLED" and child[1e-7].data.tags["vidray.stopped_early"] == "true"
    assert child[1e-3].data.tags["vidray.trial_status"] == "done"
    # Per-step curves on every trial that trained, under one metric name for the compare views.
    assert len(client.get_metric_history(child[1e-3].info.run_id, "val_loss")) == 3


def _chromium() -> str | None:
    """Debian's chromium, installed here if missing (the test machine is Debian with apt)."""
    found = shutil.which("chromium")
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                   capture_output=True, timeout=600)
    return shutil.which("chromium")


@pytest.mark.heavy
def test_mlflow_ui_shows_the_sweep_and_its_trials(asha_sweep, stack, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed and apt-get cannot install it here (needs root + apt)")
    cfg, report, _ = asha_sweep
    url = stack.env["MLFLOW_TRACKING_URI"].rstrip("/")
    client, parents, children = _runs(stack, "test-sweep-asha")
    page = f"{url}/#/experiments/{parents[0].info.experiment_id}/runs/{parents[0].info.run_id}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--window-size=1400,1200", "--virtual-time-budget=30000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=180).stdout
    # The parent run's page (rendered by the UI's JavaScript) names the sweep and every trial's run.
    assert cfg.name in dom
    for child in children:
        assert child.info.run_name in dom, child.info.run_name
    shot = tmp_path / "sweep.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", page], capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 20_000   # a rendered page, not a blank one
