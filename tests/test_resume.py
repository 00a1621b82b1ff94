"""A resumed run is the run that was not interrupted: N steps straight through against the same N
steps with a crash after the checkpoint at step R (Ray Train restarts the worker, the loop resumes
from R), on one CPU worker with Ray Data's order fixed. Parameters and the last loss must agree,
for VLM and for a frames model (All-in-one). A resume that dropped the optimizer state, replayed the
epoch's first batches or restarted a system's mask generator gives other parameters.

The crash is injected (a ``training_step`` that raises once, marked by a file): a real worker kill
cannot be placed between two given steps."""

from __future__ import annotations

import dataclasses
import os
import sys

import mlflow
import pytest
import ray.cloudpickle
import torch

from vidray.checkpoint import load_state
from vidray.config import load_config
from vidray.config.train import PretrainConfig
from vidray.train.job import run_training

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the wrapper travels to the workers

STEPS, CHECKPOINT_EVERY, CRASH_AFTER = 96, 24, 72  # 50+ steps a pass: the resume lands in epoch 1


def crashing_once(build_system, marker: str, after_step: int):
    """``build_system`` whose system raises in the step after ``after_step`` unless ``marker``
    exists (then it writes it first), and counts each attempt's steps in ``marker``.steps."""
    def build(cfg, device):
        system = build_system(cfg, device)
        train_step, calls = system.training_step, [0]

        def training_step(batch):
            calls[0] += 1
            with open(marker + ".steps", "a") as f:
                f.write(f"{calls[0]}\n")
            if calls[0] == after_step + 1 and not os.path.exists(marker):
                open(marker, "w").close()
                raise RuntimeError("injected crash (test_resume)")
            return train_step(batch)

        system.training_step = training_step
        return system
    return build


@pytest.fixture
def ordered_data():
    """Ray Data hands blocks over in dataset order (one worker then sees one fixed sequence)."""
    context = ray.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    yield
    context.execution_options.preserve_order = before


def straight_and_resumed(cfg, tmp_path, build_system, make_dataset) -> tuple[dict, dict, list[int]]:
    runs = {}
    marker = str(tmp_path / "crashed")
    for name, build in (("straight", build_system), ("resumed", crashing_once(build_system, marker, CRASH_AFTER))):
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_name=name))
        runs[name] = run_training(run_cfg, job="resume-test", experiment="test-resume", run_name=name,
                                  build_system=build, make_dataset=make_dataset, tags={}, say=lambda m: None)
    assert os.path.exists(marker), "the injected crash never happened: the test proves nothing"
    with open(marker + ".steps") as f:
        calls = [int(line) for line in f]
    return runs["straight"], runs["resumed"], calls


def assert_same_training(straight: dict, resumed: dict, calls: list[int]) -> None:
    # The second attempt trained only the steps after the checkpoint (it did not start over).
    restart = calls.index(1, 1)
    assert calls[restart - 1] == CRASH_AFTER + 1 and calls[-1] == STEPS - CRASH_AFTER, calls[restart - 3:]
    resumed_from = load_state(os.path.join(os.path.dirname(resumed["checkpoint"]),
                                           f"checkpoint_{CRASH_AFTER:08d}"))
    assert resumed_from["epoch"] >= 1 and resumed_from["epoch_batches"] > 0  # mid-way through a later pass
    a, b = load_state(straight["checkpoint"]), load_state(resumed["checkpoint"])
    assert a["step"] == b["step"] == STEPS
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    client = mlflow.MlflowClient()
    last = [client.get_metric_history(r["mlflow_run_id"], "loss")[-1].value for r in (straight, resumed)]
    assert last[0] == pytest.approx(last[1], rel=1e-5)


def _train_overrides(tmp_path, stack) -> list[str]:
    return [f"train.steps={STEPS}", "train.batch_size=4", "train.num_workers=1",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.max_failures=1", "train.shuffle_buffer=16",
            f"train.storage_path={tmp_path / 'runs'}", "optim.warmup_steps=5", "optim.lr=1e-3",
            f"mlflow.tracking_uri={stack.env['MLFLOW_TRACKING_URI']}", "mlflow.experiment=test-resume"]


def test_vlm_resumed_after_a_crash_equals_the_uninterrupted_run(feature_sets, tmp_path, stack, ordered_data):
    from vidray.data.vlm import examples_dataset, with_video_dim
    from vidray.train.vlm_system import build_system

    cfg = load_config(PretrainConfig, None, _train_overrides(tmp_path, stack) + [
        f"data.features={feature_sets['s3d']}", f"data.text={feature_sets['text']}", "model.flavour=tiny",
        "data.clips_per_video=4"])
    cfg = with_video_dim(cfg, cfg.data.features)
    straight, resumed, calls = straight_and_resumed(
        cfg, tmp_path, build_system,
        lambda: examples_dataset(cfg.data, cfg.model.max_video_tokens, seed=cfg.train.seed))
    assert_same_training(straight, resumed, calls)


def test_allinone_resumed_after_a_crash_equals_the_uninterrupted_run(frames_corpus, tmp_path, stack, ordered_data):
    from vidray.config.frames import FramesModelConfig, FramesPretrainConfig
    from vidray.data.frames import examples_dataset
    from vidray.train.frames_system import build_pretrain_system

    model = FramesModelConfig(arch="allinone", flavour="tiny", image_size=32, num_frames=3, max_text_tokens=16)
    base = load_config(PretrainConfig, None, _train_overrides(tmp_path, stack))
    cfg = FramesPretrainConfig(model=model, data=frames_corpus["frames"], optim=base.optim, train=base.train, mlflow=base.mlflow)
    straight, resumed, calls = straight_and_resumed(
        cfg, tmp_path, build_pretrain_system, lambda: examples_dataset(model, cfg.data, "train"))
    assert_same_training(straight, resumed, calls)


def test_a_finished_run_is_found_by_its_newest_checkpoint(tmp_path, s3_uri):
    from vidray import storage
    from vidray.checkpoint import CHECKPOINT_FILE
    from vidray.train.job import finished_checkpoint

    for root in (str(tmp_path / "runs"), f"{s3_uri}/runs"):
        for step in (10, 20):
            storage.makedirs(storage.join(root, "r", f"checkpoint_{step:08d}"))
            storage.write_bytes(storage.join(root, "r", f"checkpoint_{step:08d}", CHECKPOINT_FILE), b"x")
        # What Ray Train 2.60 writes beside them: a name that sorts after every checkpoint folder.
        storage.write_bytes(storage.join(root, "r", "checkpoint_manager_snapshot.json"), b"{}")
        assert finished_checkpoint(root, "r", 20) == storage.join(root, "r", "checkpoint_00000020")
        assert finished_checkpoint(root, "r", 10) is None      # a newer checkpoint: not this command's end
        assert finished_checkpoint(root, "r", 30) is None      # not finished: Ray Train resumes it
        storage.makedirs(storage.join(root, "r", "checkpoint_00000030"))   # written half-way: no state file
        assert finished_checkpoint(root, "r", 30) is None
