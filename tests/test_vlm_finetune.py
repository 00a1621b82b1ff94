"""`vidray finetune` + `vidray evaluate` on Ray Train (CPU workers) from the shared synthetic
feature sets: retrieval from a pre-training checkpoint (R@K both ways, MC-QA, table and plot in
MLflow), captioning (greedy + beam, caption metrics), action segmentation (frame accuracy), and
the errors a user can cause."""

from __future__ import annotations

import json

import mlflow
import pytest

from vidray.config import ConfigError, load_config
from vidray.jobs.cli import main as cli
from vidray.train.config import EvaluateConfig, FinetuneConfig, PretrainConfig
from vidray.vlm.evaluate import run_evaluate
from vidray.vlm.finetune import run_finetune
from vidray.vlm.pretrain import run_pretrain


def _common(feature_sets, tmp_path, stack, experiment: str) -> list[str]:
    return [f"data.features={feature_sets['s3d']}", f"data.text={feature_sets['text']}",
            "model.flavour=tiny", "train.batch_size=8", "train.checkpoint_every=1000", "train.log_every=10",
            f"train.storage_path={tmp_path / 'runs'}", "optim.warmup_steps=3", "optim.lr=1e-3",
            f"mlflow.tracking_uri={stack.env['MLFLOW_TRACKING_URI']}", f"mlflow.experiment={experiment}"]


def _finetune(feature_sets, tmp_path, stack, *overrides: str) -> dict:
    cfg = load_config(FinetuneConfig, None, _common(feature_sets, tmp_path, stack, "test-finetune") + [
        f"data.manifest={feature_sets['manifest']}", "data.split=train", *overrides])
    return run_finetune(cfg, say=print)


def _evaluate(checkpoint: str, stack, **fields) -> dict:
    cfg = EvaluateConfig(checkpoint=checkpoint, split="test", **fields)
    cfg.mlflow.tracking_uri = stack.env["MLFLOW_TRACKING_URI"]
    cfg.mlflow.experiment = "test-evaluate"
    return run_evaluate(cfg, say=print)


@pytest.fixture(scope="module")
def pretrained(feature_sets, tmp_path_factory, stack):
    tmp = tmp_path_factory.mktemp("pre")
    cfg = load_config(PretrainConfig, None, _common(feature_sets, tmp, stack, "test-finetune-pre") + [
        "train.steps=6", "train.num_workers=1", "data.clips_per_video=4"])
    return run_pretrain(cfg, say=print)["checkpoint"]


@pytest.mark.heavy
def test_retrieval_from_a_pretrained_checkpoint_is_evaluated_and_tracked(feature_sets, pretrained, tmp_path, stack):
    tuned = _finetune(feature_sets, tmp_path, stack, "task=retrieval", f"init_from={pretrained}",
                      "train.steps=30", "train.num_workers=2")
    assert tuned["metrics"]["step"] == 30 and tuned["checkpoint"].endswith("checkpoint_00000030")
    client = mlflow.MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    run = client.get_run(tuned["mlflow_run_id"])
    assert run.data.params["task"] == "retrieval" and run.data.params["init_from"] == pretrained
    assert run.data.tags["feature_set.s3d"] == feature_sets["s3d"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 31))

    report = _evaluate(tuned["checkpoint"], stack, mc=str(feature_sets["corpus"] / "mc.jsonl"))
    metrics = report["metrics"]
    test_clips = sum(1 for row in (feature_sets["corpus"] / "mc.jsonl").read_text().splitlines()
                     if json.loads(row)["video"] in _test_videos(feature_sets))
    assert metrics["examples"] == test_clips > 3   # one clip per caption of the test videos
    assert metrics["chance_R1"] == pytest.approx(1 / test_clips)
    for key in ("t2v_R1", "t2v_R5", "t2v_R10", "v2t_R1", "t2v_MdR", "v2t_MdR"):
        assert key in metrics
    assert 0 <= metrics["t2v_R1"] <= metrics["t2v_R5"] <= metrics["t2v_R10"] <= 1
    assert metrics["mc_questions"] == test_clips and metrics["mc_chance"] == pytest.approx(0.2)
    assert 0 <= metrics["mc_accuracy"] <= 1

    evaluation = client.get_run(report["mlflow_run_id"])
    assert evaluation.data.metrics["t2v_R1"] == pytest.approx(metrics["t2v_R1"])
    assert evaluation.data.tags["checkpoint_uri"] == tuned["checkpoint"]
    artifacts = {a.path for a in client.list_artifacts(report["mlflow_run_id"], "eval/test")}
    assert {"eval/test/retrieval.json", "eval/test/multiple_choice.json", "eval/test/recall_at_k.png"} <= artifacts
    table = json.loads(open(client.download_artifacts(report["mlflow_run_id"], "eval/test/retrieval.json",
                                                      str(tmp_path))).read())
    assert len(table["data"]) == test_clips
    ranks = [row[table["columns"].index("t2v_rank")] for row in table["data"]]
    assert sum(r == 1 for r in ranks) / test_clips == pytest.approx(metrics["t2v_R1"])


def _test_videos(feature_sets) -> set[str]:
    from vidray.manifest import read_manifest

    table = read_manifest(feature_sets["manifest"]).to_pylist()
    return {r["video_id"] for r in table if r["split"] == "test"}


@pytest.mark.heavy
def test_captioning_generates_and_scores_captions(feature_sets, tmp_path, stack, s3_uri):
    # Checkpoints on the local S3 endpoint: evaluate reads the model back from there.
    tuned = _finetune(feature_sets, tmp_path, stack, "task=captioning", "train.steps=20", "train.num_workers=1",
                      f"train.storage_path={s3_uri}/runs")
    assert tuned["checkpoint"].startswith(f"{s3_uri}/runs/vlm-captioning-")
    report = _evaluate(tuned["checkpoint"], stack, beam_size=2, max_caption_tokens=8)
    metrics = report["metrics"]
    for decoder in ("greedy", "beam"):
        for name in ("BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
            assert f"{decoder}_{name}" in metrics
    client = mlflow.MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    path = client.download_artifacts(report["mlflow_run_id"], "eval/test/captions.json", str(tmp_path))
    table = json.loads(open(path).read())
    assert table["columns"] == ["video_id", "clip_index", "reference", "greedy", "beam"]
    assert all(len(row[3].split()) <= 8 for row in table["data"])


@pytest.mark.heavy
def test_action_segmentation_reports_frame_accuracy(feature_sets, tmp_path, stack):
    labels = str(feature_sets["corpus"] / "coin.json")
    tuned = _finetune(feature_sets, tmp_path, stack, "task=action_segmentation", f"data.labels={labels}",
                      "train.steps=20", "train.num_workers=1", "model.max_video_tokens=4",
                      "data.segment_stride=2")
    report = _evaluate(tuned["checkpoint"], stack)
    metrics = report["metrics"]
    assert metrics["chance_accuracy"] == pytest.approx(1 / 4)   # four directions of motion
    assert 0 <= metrics["frame_accuracy"] <= 1 and metrics["seconds"] > 0


def test_init_from_a_checkpoint_of_another_model_size_is_refused(feature_sets, pretrained, tmp_path, stack):
    cfg = load_config(FinetuneConfig, None, _common(feature_sets, tmp_path, stack, "x") + [
        f"init_from={pretrained}", "model.flavour=small"])
    from vidray.vlm.finetune import FinetuneSystem

    with pytest.raises(ConfigError, match=r"model.flavour.*'tiny' there"):
        FinetuneSystem(cfg, "cpu")


def test_cli_errors_name_the_key(capsys, feature_sets):
    assert cli(["evaluate"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert cli(["finetune", "task=retrieval", "data.features=" + str(feature_sets["s3d"])]) == 2
    assert "data.text" in capsys.readouterr().err
    assert cli(["finetune", "task=action_segmentation", "data.features=" + str(feature_sets["s3d"])]) == 2
    assert "data.labels" in capsys.readouterr().err
    assert cli(["evaluate", "checkpoint=/nonexistent/checkpoint_00000001"]) == 2
    assert "does not exist" in capsys.readouterr().err

