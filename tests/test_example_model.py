"""The example model (`vidray.models.example`): one file plus one line in `vidray.archs.FRAMES_ARCHS`,
and every job takes it as it takes All-in-one: pre-training, fine-tuning and evaluation, run through
the CLI as a user runs them (docs/layout.md, "Add a model")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import torch

from conftest import REPO
from vidray import archs
from vidray.config.frames import FramesModelConfig
from vidray.models.build import build_net, size_figures

MODEL = FramesModelConfig(arch="example", flavour="tiny", image_size=32, num_frames=3, max_text_tokens=12)


def test_the_example_model_keeps_the_backbone_layout_its_recipe_reads():
    assert archs.FRAMES_ARCHS["example"] == archs.FramesArch("vidray.models.example:build")
    torch.manual_seed(0)
    net = build_net(MODEL, num_answers=5).eval()
    frames = torch.randn(2, 3, 3, 32, 32)
    ids = torch.randint(1000, 2000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    h = net.backbone.hidden_size
    with torch.no_grad():
        joint, text, video = net(frames, ids, mask), net(None, ids, mask), net(frames, None)
        assert joint.shape == (2, 12 + 1 + 3, h) and text.shape == (2, 12, h) and video.shape == (2, 1 + 3, h)
        # The padding is masked: another id in a padded slot changes nothing of the real slots.
        other = ids.clone()
        other[1, 10] = 1234
        torch.testing.assert_close(net(frames, other, mask)[1, :8], joint[1, :8])
        # The joint pass fuses: the text's [CLS] state (what matching and QA read) sees the frames.
        assert not torch.allclose(net(frames.flip(0), ids, mask)[:, 0], joint[:, 0])
        assert net.encode_text(ids, mask).norm(dim=-1).allclose(torch.ones(2))
        assert net.qa[-1].out_features == 5
    figures = size_figures(MODEL)
    assert figures["model.parameters"] > 0 and figures["model.gflops_per_clip"] > 0


def _vidray(*argv: str, cwd, env) -> dict:
    out = subprocess.run([sys.executable, "-m", "vidray.jobs.cli", *argv], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_the_example_model_pretrains_finetunes_and_evaluates_through_the_cli(ray_cluster, frames_corpus, tmp_path):
    """On the session's cluster (RAY_ADDRESS) and its S3 endpoint, with the All-in-one presets and
    `model.arch=example`: the run is tagged with its arch, its MLM loss falls from log(vocabulary),
    and the fine-tuned checkpoint is evaluated as All-in-one's is."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    data = frames_corpus["frames"]
    common = ["model.arch=example", "model.image_size=32", "model.max_text_tokens=12", f"data.frames={data.frames}",
              f"data.manifest={data.manifest}", "train.batch_size=8", "train.log_every=1", "optim.warmup_steps=2",
              f"train.storage_path={tmp_path / 'runs'}", "mlflow.experiment=test-example-model"]
    pretrain = _vidray("pretrain", os.path.join(REPO, "configs/demo/allinone_pretrain.yaml"), *common,
                       "train.steps=15", "train.checkpoint_every=15", cwd=tmp_path, env=env)
    assert pretrain["checkpoint"].endswith("checkpoint_00000015")
    client = mlflow.MlflowClient()
    run = client.get_run(pretrain["mlflow_run_id"])
    assert run.data.tags["arch"] == "example"
    assert float(run.data.params["model.parameters"]) == size_figures(MODEL)["model.parameters"]
    mlm = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "mlm_loss"), key=lambda m: m.step)]
    assert len(mlm) == 15 and mlm[0] > 9.0 and min(mlm[-3:]) < mlm[0] - 0.3, mlm

    finetune = _vidray("finetune", os.path.join(REPO, "configs/demo/allinone_finetune_retrieval.yaml"), *common,
                       f"init_from={pretrain['checkpoint']}", "train.steps=5", "train.checkpoint_every=5",
                       cwd=tmp_path, env=env)
    assert client.get_run(finetune["mlflow_run_id"]).data.tags["init_from"] == pretrain["checkpoint"]
    evaluation = _vidray("evaluate", f"checkpoint={finetune['checkpoint']}", "split=train", cwd=tmp_path, env=env)
    metrics = evaluation["metrics"]
    assert evaluation["task"] == "retrieval" and metrics["examples"] >= 6
    assert 0 <= metrics["t2v_R1"] <= metrics["t2v_R5"] <= 1
