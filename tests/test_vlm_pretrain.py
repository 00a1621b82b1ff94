"""VLM pre-training on Ray Train (2 CPU workers): FSDP checkpoints whole states and resumes, the
compiled step, FLOPs, validation and the MLflow server's params, per-step metrics and artifacts.
A lost worker (with its node) mid-run: tests/test_multinode.py."""

from __future__ import annotations

import pytest

from vidray.config import load_config
from vidray.config.train import PretrainConfig
from vidray.train.vlm_pretrain import run_pretrain


def _config(feature_sets, tmp_path, stack, steps: int) -> PretrainConfig:
    return load_config(PretrainConfig, None, [
        f"data.features={feature_sets['s3d']}", f"data.text={feature_sets['text']}",
        "data.clips_per_video=32", "model.flavour=tiny", f"train.steps={steps}", "train.batch_size=8",
        "train.num_workers=2", "train.checkpoint_every=20", "train.max_failures=2",
        f"train.storage_path={tmp_path / 'runs'}", "optim.warmup_steps=5", "optim.lr=1e-3",
        f"mlflow.tracking_uri={stack.env['MLFLOW_TRACKING_URI']}", "mlflow.experiment=test-pretrain"])


@pytest.mark.heavy
def test_fsdp_pretraining_checkpoints_whole_states_and_resumes(feature_sets, tmp_path, stack):
    """FSDP2 on 2 CPU workers: the checkpoint holds unsharded states (a plain one-device VLM loads
    them), and a longer rerun of the same run resumes from it with continuous steps."""
    import mlflow
    import torch

    from vidray.checkpoint import load_state
    from vidray.models.vlm import build_vlm
    from vidray.train.vlm_system import Pretrainer

    base = _config(feature_sets, tmp_path, stack, steps=10)
    overrides = ["train.strategy=fsdp", "train.run_name=fsdp-run", "train.checkpoint_every=10",
                 f"data.features={feature_sets['s3d']}", f"data.text={feature_sets['text']}",
                 "model.flavour=tiny", "train.num_workers=2", "train.batch_size=8", "optim.lr=1e-3",
                 f"train.storage_path={tmp_path / 'runs'}", "mlflow.experiment=test-pretrain",
                 f"mlflow.tracking_uri={stack.env['MLFLOW_TRACKING_URI']}"]
    first = run_pretrain(load_config(PretrainConfig, None, overrides + ["train.steps=10"]), say=print)
    assert first["metrics"]["step"] == 10 and base.train.strategy == "ddp"

    state = load_state(first["checkpoint"])
    plain = Pretrainer(build_vlm(base.model), "masked_token")
    plain.load_state_dict(state["model"])                 # whole tensors, plain names
    assert all(not type(t).__name__.startswith("DTensor") for t in state["model"].values())
    assert torch.isfinite(torch.tensor(first["metrics"]["loss"]))

    again = run_pretrain(load_config(PretrainConfig, None, overrides + ["train.steps=20"]), say=print)
    assert again["metrics"]["step"] == 20 and again["mlflow_run_id"] == first["mlflow_run_id"]
    client = mlflow.MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    steps = sorted(m.step for m in client.get_metric_history(again["mlflow_run_id"], "loss"))
    assert steps == list(range(1, 21))


def test_mfu_divides_by_the_bf16_peak_of_the_gpus_the_table_knows():
    from vidray.train.loop import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_tflops("Intel Arc") is None


def test_compiled_training_on_two_workers_logs_flops_and_checkpoints_plain_names(feature_sets, tmp_path, stack):
    """``train.compile=true`` under DDP on 2 CPU workers: the compiled layers train, and the
    checkpoint loads into an uncompiled model. The first micro-batch is counted by torch's FLOP
    counter as it runs (no extra pass); every step then logs TFLOP/s per worker, and MFU only on a
    GPU whose bf16 peak the table knows (none on CPU)."""
    import mlflow
    import torch

    from vidray.checkpoint import load_state
    from vidray.models.vlm import build_vlm
    from vidray.train.vlm_system import Pretrainer

    cfg = _config(feature_sets, tmp_path, stack, steps=4)
    cfg.train.compile, cfg.train.checkpoint_every, cfg.train.run_name = True, 4, "compiled"
    report = run_pretrain(cfg, say=print)
    assert report["metrics"]["step"] == 4 and torch.isfinite(torch.tensor(report["metrics"]["loss"]))
    assert report["metrics"]["tflops_per_worker"] > 0 and "mfu" not in report["metrics"]
    Pretrainer(build_vlm(cfg.model), "masked_token").load_state_dict(load_state(report["checkpoint"])["model"])
    client = mlflow.MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    assert client.get_run(report["mlflow_run_id"]).data.params["train.compile"] == "True"
    assert len(client.get_metric_history(report["mlflow_run_id"], "tflops_per_worker")) == 4
