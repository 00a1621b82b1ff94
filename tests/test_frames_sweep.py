"""`vidray sweep` over the frames models: pretrain.model.arch picks the schema of the trials'
configs, the metric checks know what each arch's pre-training reports, and a real sweep of tiny
All-in-one (Ray Tune, MLflow, a frames feature set) pre-trains, fine-tunes and evaluates each trial."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from vidray import archs
from vidray.config import ConfigError
from vidray.config.frames import FramesFinetuneConfig, FramesPretrainConfig
from vidray.config.train import FinetuneConfig, PretrainConfig
from vidray.tuning.config import pretrain_metrics
from vidray.tuning.space import check, trial_configs
from vidray.tuning.sweep import concurrency, load_sweep

MODEL = {"arch": "allinone", "flavour": "tiny", "image_size": 32, "num_frames": 3, "max_text_tokens": 24}


def _write(tmp_path, data: dict) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _frames_sweep(**top) -> dict:
    return {"pretrain": {"model": dict(MODEL),
                         "data": {"frames": "s3://b/frames/v-1", "manifest": "s3://b/manifest.parquet",
                                  "qa": "s3://b/qa.jsonl"},
                         "train": {"steps": 20, "val_every": 10, "num_workers": 1}},
            "space": {"objective.vtm_weight": {"grid": [0.5, 1.0]}}, **top}


# --- the config, without Ray -----------------------------------------------------------------

def test_a_frames_sweep_builds_frames_trial_configs_with_the_space_values(tmp_path):
    cfg = load_sweep(_write(tmp_path, _frames_sweep(finetune={"task": "retrieval", "data": {"split": "val"}},
                                                    metric="t2v_R1", mode="max",
                                                    scheduler={"metric": "val_loss", "mode": "min"})), [])
    assert type(cfg.pretrain) is FramesPretrainConfig and type(cfg.finetune) is FramesFinetuneConfig
    assert cfg.arch == "allinone" and cfg.finetune.model.arch == "allinone"
    assert check(cfg) == []
    forced = {"pretrain": {"train": {"run_name": "s-t1"}}, "finetune": {"train": {"run_name": "s-t1-ft"}}}
    pretrain, finetune = trial_configs(cfg, {"objective.vtm_weight": 0.5, "finetune.optim.lr": 1e-3}, forced)
    assert type(pretrain) is FramesPretrainConfig and type(finetune) is FramesFinetuneConfig
    assert pretrain.objective.vtm_weight == 0.5 and pretrain.train.run_name == "s-t1"
    assert pretrain.model.image_size == 32 and finetune.model == pretrain.model    # same architecture
    assert finetune.optim.lr == 1e-3 and finetune.train.run_name == "s-t1-ft"
    # Empty data URIs come from pre-training; fine-tuning's own split stays its own.
    assert (finetune.data.frames, finetune.data.manifest, finetune.data.qa) == (
        "s3://b/frames/v-1", "s3://b/manifest.parquet", "s3://b/qa.jsonl")
    assert finetune.data.split == "val"
    with pytest.raises(ConfigError, match="pretrain.objective.vtm_weight"):
        trial_configs(cfg, {"objective.vtm_weight": -1.0}, forced)
    # The space is checked against the frames schema: a VLM-only key is not one of its keys.
    with pytest.raises(ConfigError, match=r"space.objective.mmm_ratio.*not a pretrain config key"):
        check(load_sweep(None, [f"pretrain.{k}={v}" for k, v in (("model.arch", "allinone"),
                                                                  ("train.val_every", 10))]
                         + ["space.objective.mmm_ratio={grid: [0.1]}"]))


def test_a_vlm_sweep_keeps_the_vlm_schema():
    cfg = load_sweep(None, ["pretrain.train.val_every=10", "finetune.task=retrieval", "metric=t2v_R1",
                            "scheduler.metric=val_loss", "space.objective.mmm_ratio={grid: [0.0, 0.5]}"])
    assert type(cfg.pretrain) is PretrainConfig and type(cfg.finetune) is FinetuneConfig
    pretrain, finetune = trial_configs(cfg, {"objective.mmm_ratio": 0.5}, {})
    assert type(pretrain) is PretrainConfig and type(finetune) is FinetuneConfig


def test_metrics_are_checked_against_what_the_arch_reports():
    base = ["pretrain.model.arch=allinone", "pretrain.train.val_every=10",
            "space.objective.vtm_weight={grid: [0.5]}"]
    for metric in ("val_loss", "val_mlm_loss", "vtm_accuracy"):   # frames pre-training reports these
        assert load_sweep(None, [*base, f"metric={metric}"]).metric == metric
    from vidray.tuning.sweep import _scheduler

    asha = _scheduler(load_sweep(None, [*base, "metric=val_loss", "scheduler.name=asha", "pretrain.train.steps=20"]))
    assert (type(asha).__name__, asha._metric, asha._max_t) == ("AsyncHyperBandScheduler", "val_loss", 20)
    with pytest.raises(ConfigError, match=r"'metric'.*allinone pre-training.*val_mlm_loss"):
        load_sweep(None, [*base, "metric=val_loss_video"])                     # a VLM-only metric
    with pytest.raises(ConfigError, match=r"'scheduler.metric'.*allinone.*got 'val_acc_text'"):
        load_sweep(None, [*base, "scheduler.metric=val_acc_text"])
    # With a finetune: stage the sweep's metric may be an evaluation metric; ASHA's may not.
    assert load_sweep(None, [*base, "finetune.task=retrieval", "metric=t2v_R1", "mode=max",
                             "scheduler.metric=val_loss", "scheduler.mode=min"]).metric == "t2v_R1"


def test_an_unknown_or_mismatched_arch_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"'pretrain.model.arch'.*unknown architecture 'allinon'.*allinone"):
        load_sweep(None, ["pretrain.model.arch=allinon", "space.objective.vtm_weight={grid: [0.5]}"])
    with pytest.raises(ConfigError, match=r"'finetune.model.arch'.*lavender.*allinone"):
        load_sweep(None, ["pretrain.model.arch=allinone", "finetune.model.arch=lavender", "metric=t2v_R1",
                          "space.objective.vtm_weight={grid: [0.5]}"])
    with pytest.raises(ConfigError, match=r"'pretrain.model.image_size'"):      # the frames schema's check
        load_sweep(None, ["pretrain.model.arch=allinone", "pretrain.model.image_size=8",
                          "space.objective.vtm_weight={grid: [0.5]}"])
    with pytest.raises(ConfigError, match=r"'finetune'.*mapping"):
        load_sweep(None, ["pretrain.model.arch=allinone", "finetune=retrieval",
                          "space.objective.vtm_weight={grid: [0.5]}"])


def test_every_registered_arch_has_its_configs_runners_and_sweep_metrics():
    """Every architecture of vidray.archs has its job configs, runners, evaluator, sweep metrics
    and (a frames model) its build function and recipe: one registry line is all it takes."""
    assert set(archs.ARCH_JOBS["pretrain"]) == set(archs.ARCH_JOBS["finetune"]) == {"vlm", *archs.FRAMES_ARCHS}
    for arch in archs.ARCH_JOBS["pretrain"]:
        assert "loss" in pretrain_metrics(arch) and "val_loss" in pretrain_metrics(arch)
        if arch != "vlm":
            assert callable(archs.load(archs.FRAMES_ARCHS[arch].build))
            assert archs.FRAMES_ARCHS[arch].recipe in archs.RECIPE_TASKS
        for job in ("pretrain", "finetune"):  # what a sweep reads and sets on every job config
            assert {"model", "train", "data", "mlflow"} <= {f.name for f in dataclasses.fields(archs.config_class(job, arch))}
            assert callable(archs.runner(job, arch))
        assert callable(archs.evaluator(arch)), f"add {arch}'s evaluator to vidray.archs.EVALUATORS"
    assert set(archs.EVALUATORS) == set(archs.ARCH_JOBS["finetune"])
    with pytest.raises(ConfigError, match=r"'checkpoint'.*'x' model, which no evaluator knows"):
        archs.evaluator("x")
    assert archs.arch_of_dict({}) == "vlm" and archs.arch_of_dict({"model": {"arch": "lavender"}}) == "lavender"
    with pytest.raises(ConfigError, match=r"'model.arch'.*unknown architecture 'x'.*vlm, allinone"):
        archs.config_class("pretrain", "x")


def test_the_demo_preset_is_a_frames_sweep_and_concurrency_reads_its_train_config():
    cfg = load_sweep(os.path.join(REPO, "configs/demo/allinone_sweep.yaml"),
                     ["pretrain.data.frames=s3://b/frames/v-1", "pretrain.data.manifest=s3://b/m.parquet"])
    assert type(cfg.pretrain) is FramesPretrainConfig and type(cfg.finetune) is FramesFinetuneConfig
    assert check(cfg) == [] and cfg.scheduler.name == "asha" and cfg.metric == "t2v_R1"
    assert concurrency(cfg, {"CPU": 4}) == 1 and concurrency(cfg, {"CPU": 16}) == 5


def test_cli_prints_a_frames_sweep_and_names_an_unknown_arch():
    preset = os.path.join(REPO, "configs/demo/allinone_sweep.yaml")
    proc = subprocess.run([sys.executable, "-m", "vidray.jobs.cli", "sweep", preset, "--print-config"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["pretrain"]["model"]["image_size"] == 64 and "vtm_weight" in printed["pretrain"]["objective"]
    assert printed["finetune"]["model"]["arch"] == "allinone" and "frames" in printed["finetune"]["data"]
    proc = subprocess.run([sys.executable, "-m", "vidray.jobs.cli", "sweep", preset, "pretrain.model.arch=vlmm"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pretrain.model.arch" in proc.stderr and "allinone" in proc.stderr


# --- a real sweep ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def frames_set(feature_sets):
    """A frames feature set of the session's corpus: 3 frames of 32 px per caption clip."""
    from vidray.feature_store.extract import ExtractConfig, run_extract
    from vidray.feature_store.extractors import FramesExtractConfig

    made = run_extract(ExtractConfig(manifest=feature_sets["manifest"], root=str(feature_sets["root"] / "features"),
                                     extractor="frames", videos_per_part=8,
                                     frames=FramesExtractConfig(num_frames=3, size=32)), progress=False)
    return made["uri"]


@pytest.mark.heavy
def test_allinone_sweep_pretrains_finetunes_and_evaluates_every_trial(frames_set, feature_sets, tmp_path, stack,
                                                                       ray_cluster):
    import mlflow

    from vidray.tuning.sweep import run_sweep

    experiment = "test-sweep-allinone"
    train = {"batch_size": 8, "num_workers": 1, "log_every": 5}
    config = _write(tmp_path, {
        "name": "allinone-vtm", "storage_path": str(tmp_path / "sweeps"), "max_concurrent_trials": 1,
        "mlflow": {"tracking_uri": stack.env["MLFLOW_TRACKING_URI"], "experiment": experiment},
        "pretrain": {"model": MODEL, "data": {"frames": frames_set, "manifest": feature_sets["manifest"]},
                     "optim": {"lr": 5e-4, "warmup_steps": 5},
                     "train": {**train, "steps": 10, "val_every": 5, "checkpoint_every": 10}},
        "finetune": {"task": "retrieval", "optim": {"lr": 5e-4, "warmup_steps": 2},
                     "train": {**train, "steps": 5, "checkpoint_every": 5}},
        "evaluate": {"split": "val"},
        "space": {"objective.vtm_weight": {"grid": [0.5, 1.0]}},
        "metric": "t2v_R1", "mode": "max",
        # With two trials ASHA's outcome would hang on which one learns faster by step 5; its
        # decisions are tested on VLM (test_sweep.py), its metric check for frames above.
        "scheduler": {"name": "none", "metric": "val_loss", "mode": "min"}})
    lines: list[str] = []
    report = run_sweep(load_sweep(config, []), say=lines.append)

    assert [t["status"] for t in report["trials"]] == ["done", "done"], "\n".join(lines)[-3000:]
    assert sorted(t["objective.vtm_weight"] for t in report["trials"]) == [0.5, 1.0]
    assert all(t["val_loss"] is not None and t["t2v_R1"] is not None and t["steps"] == 10 for t in report["trials"])
    assert report["best"]["trial"] in {t["trial"] for t in report["trials"]}
    assert f"best trial {report['best']['trial']}: t2v_R1" in "\n".join(lines)

    client = mlflow.MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("job") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    assert sorted(float(c.data.params["objective.vtm_weight"]) for c in children) == [0.5, 1.0]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["vidray.trial_status"] == "done"
        assert child.data.params["model.arch"] == "allinone"
        assert "val_loss" in child.data.metrics and "val_mlm_loss" in child.data.metrics
        assert "t2v_R1" in child.data.metrics      # the evaluation of its fine-tuning
        assert child.data.params["finetune.data.frames"] == frames_set
        # Its fine-tuning and evaluation are runs nested under it.
        nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == child.info.run_id]
        assert len(nested) == 2, [r.info.run_name for r in nested]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_done"] == 2
    assert parent.data.tags["best_trial"] == report["best"]["trial"]
    best = client.download_artifacts(parent.info.run_id, "best_config.yaml", str(tmp_path))
    assert yaml.safe_load(open(best))["model"]["arch"] == "allinone"
    assert json.loads(parent.data.tags["best_params"])["objective.vtm_weight"] == report["best"]["objective.vtm_weight"]


def test_the_tokenizer_choice_preset_sweeps_evilm_mvm_targets():
    """configs/demo/evilm_sweep_tokenizer.yaml: each trial's E-ViLM pre-training gets one of the
    tokenizer choices, the vq sets reach fine-tuning too, and QA accuracy picks the best."""
    vq = {"semantic": "s3://b/vq/v-s", "pixel": "s3://b/vq/v-p"}
    cfg = load_sweep(os.path.join(REPO, "configs/demo/evilm_sweep_tokenizer.yaml"),
                     ["pretrain.data.frames=s3://b/frames/v-1", "pretrain.data.manifest=s3://b/m.parquet",
                      "pretrain.data.qa=s3://b/qa.jsonl", f"pretrain.data.vq.semantic={vq['semantic']}",
                      f"pretrain.data.vq.pixel={vq['pixel']}"])
    assert cfg.arch == "evilm" and cfg.metric == "qa_accuracy" and check(cfg) == []
    choices = cfg.space["objective.mvm_tokenizer"]["grid"]
    assert choices == ["semantic", "pixel", "none"]
    for choice in choices:
        pretrain, finetune = trial_configs(cfg, {"objective.mvm_tokenizer": choice}, {})
        assert pretrain.objective.mvm_tokenizer == choice and pretrain.data.vq == vq
        assert finetune.task == "qa" and finetune.model == pretrain.model
    with pytest.raises(ConfigError, match="mvm_tokenizer"):
        trial_configs(cfg, {"objective.mvm_tokenizer": "dalle"}, {})
