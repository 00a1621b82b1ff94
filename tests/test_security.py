"""Security basics: credentials never reach MLflow params, artifacts, checkpoints or logs; a
checkpoint loads with ``weights_only`` so it cannot run code; names from configs cannot point
outside their storage root."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from vidray.checkpoint import read_checkpoint
from vidray.config import ConfigError, check_name, dump_yaml, flatten, load_config, redact
from vidray.config.train import PretrainConfig
from vidray.train.loop import load_checkpoint, rng_state, save_checkpoint, set_rng_state

SECRET = "s3cr3t-pa55"


def test_credentials_in_config_values_are_masked_wherever_configs_are_written():
    cfg = load_config(PretrainConfig, None, [f"mlflow.tracking_uri=https://alice:{SECRET}@mlflow.example.com",
                                             f"train.storage_path=s3://runs/x"])
    assert cfg.mlflow.tracking_uri.endswith(f"{SECRET}@mlflow.example.com")  # the job itself keeps it
    params = flatten(cfg)
    assert params["mlflow.tracking_uri"] == "https://alice:***@mlflow.example.com"
    assert SECRET not in dump_yaml(cfg) and SECRET not in str(params)
    assert redact({"db_password": "x", "api_token": "y", "tokenizer": "bert-base-uncased", "empty_secret": ""}) == {
        "db_password": "***", "api_token": "***", "tokenizer": "bert-base-uncased", "empty_secret": ""}


def test_print_config_masks_the_password(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vidray.jobs.cli", "pretrain", "configs/demo/pretrain.yaml",
                          f"mlflow.tracking_uri=http://alice:{SECRET}@127.0.0.1:5000", "--print-config"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "alice:***@127.0.0.1:5000" in out.stdout and SECRET not in out.stdout + out.stderr


class _Optim:
    def state_dict(self):
        return {"last_epoch": 3}


def test_checkpoints_hold_plain_values_load_weights_only_and_keep_every_rng(tmp_path):
    import random

    np.random.seed(5), random.seed(5), torch.manual_seed(5)
    save_checkpoint(str(tmp_path), {"w": torch.ones(2)}, {"state": {}}, _Optim(), 7,
                    {"mlflow": {"tracking_uri": f"http://bob:{SECRET}@host"}})
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    state = load_checkpoint(str(tmp_path))  # weights_only=True inside
    assert state["step"] == 7 and state["config"]["mlflow"]["tracking_uri"] == "http://bob:***@host"
    assert SECRET.encode() not in (tmp_path / "state.pt").read_bytes()
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    set_rng_state(state["rng"])
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected
    assert isinstance(rng_state()["numpy"][1], torch.Tensor)


class _RunsCode:
    """What a hostile checkpoint carries: unpickling it would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_carrying_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "state.pt"
    torch.save({"model": {}, "payload": _RunsCode(str(marker))}, bad)
    assert not marker.exists()
    with pytest.raises(ValueError, match="holds Python objects.*train it again"):
        read_checkpoint(str(bad), str(bad))
    assert not marker.exists()


@pytest.mark.parametrize("value", ["../../elsewhere", "a/b", ".hidden", "", "x" * 201])
def test_names_that_become_folders_cannot_leave_their_root(value):
    if value:
        with pytest.raises(ConfigError, match="not a plain name"):
            check_name("train.run_name", value)
        with pytest.raises(ConfigError, match="train.run_name"):
            load_config(PretrainConfig, None, [f"train.run_name={value}"])
    else:  # empty = derived
        assert load_config(PretrainConfig, None, ["train.run_name="]).train.run_name in ("", None)
    assert check_name("k", "vlm-pretrain-3f2a.v1_lr=1e-4") == "vlm-pretrain-3f2a.v1_lr=1e-4"
