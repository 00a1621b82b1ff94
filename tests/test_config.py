"""Typed configs: presets load, overrides apply, bad values fail naming the key, round trips."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from vidray.config import ConfigError, dump_yaml, flatten, from_dict, load_config, parse_overrides
from vidray.config.frames import FramesFinetuneConfig, FramesPretrainConfig, VQTokenizerConfig
from vidray.config.train import FinetuneConfig, PretrainConfig
from vidray.data.clips import ClipsConfig
from vidray.tuning.config import SweepConfig

PRESETS = {"pretrain": PretrainConfig, "vlm_pretrain": PretrainConfig, "clips": ClipsConfig,
           "finetune_retrieval": FinetuneConfig, "vlm_finetune_retrieval": FinetuneConfig,
           "vlm_finetune_captioning": FinetuneConfig, "vlm_finetune_segmentation": FinetuneConfig,
           "sweep": SweepConfig, "vlm_sweep_mmm": SweepConfig,
           "allinone_pretrain": FramesPretrainConfig, "allinone_finetune_retrieval": FramesFinetuneConfig,
           "allinone_finetune_qa": FramesFinetuneConfig, "lavender_pretrain": FramesPretrainConfig,
           "lavender_finetune_qa": FramesFinetuneConfig, "allinone_sweep": SweepConfig,
           "lavender_finetune_retrieval": FramesFinetuneConfig, "lavender_finetune_mc": FramesFinetuneConfig,
           "lavender_finetune_multi": FramesFinetuneConfig, "evilm_pretrain": FramesPretrainConfig,
           "evilm_finetune_retrieval": FramesFinetuneConfig, "evilm_finetune_qa": FramesFinetuneConfig,
           "vq_semantic": VQTokenizerConfig, "vq_pixel": VQTokenizerConfig, "evilm_sweep_tokenizer": SweepConfig}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml"))))
def test_every_preset_loads_and_round_trips(path):
    cls = PRESETS[os.path.basename(path).removesuffix(".yaml")]
    cfg = load_config(cls, path)
    again = from_dict(cls, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    assert dump_yaml(again) == dump_yaml(cfg)


def test_overrides_apply_with_yaml_types():
    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs/demo/pretrain.yaml"),
                      ["objective.mmm_ratio=0.3", "optim.betas=[0.9, 0.99]", "model.text_backbone=null",
                       "train.use_gpu=true", "train.run_name=exp-1", "optim.lr=1e-3"])
    assert cfg.objective.mmm_ratio == 0.3
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.model.text_backbone is None
    assert cfg.train.use_gpu is True and cfg.train.run_name == "exp-1"
    assert cfg.train.steps == 300  # from the preset, untouched
    assert cfg.optim.lr == 1e-3  # YAML 1.1 would read '1e-3' as a string


@pytest.mark.parametrize("override, key, words", [
    ("objective.mmm_ratio=1.5", "objective.mmm_ratio", "<= 1"),
    ("objective.mmm_ratio=-0.1", "objective.mmm_ratio", ">= 0"),
    ("objective.mmm_rato=0.3", "objective.mmm_rato", "did you mean 'objective.mmm_ratio'"),
    ("train.steps=ten", "train.steps", "expected an integer"),
    ("train.steps=2.5", "train.steps", "expected an integer"),
    ("train.use_gpu=1", "train.use_gpu", "true or false"),
    ("objective.name=mlm", "objective.name", "one of 'masked_token', 'mfm_mlm'"),
    ("optim.betas=[0.9]", "optim.betas", "two numbers"),
    ("optim=3", "optim", "expected a mapping"),
    ("nonsense.key=1", "nonsense", "unknown key"),
])
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, None, [override])
    assert info.value.key == key
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_required_and_cross_field_checks():
    with pytest.raises(ConfigError, match="'manifest': is required"):
        load_config(ClipsConfig, None, ["output=/tmp/x"])


def test_flatten_gives_dotted_string_params():
    params = flatten(load_config(PretrainConfig, None, ["objective.mmm_ratio=0.7"]))
    assert params["objective.mmm_ratio"] == "0.7"
    assert params["optim.betas"] == "[0.9, 0.98]"
    assert params["model.text_backbone"] == "null"
    assert all(isinstance(v, str) for v in params.values())


def test_parse_overrides_rejects_malformed():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["justakey"])


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "vidray.jobs.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_rejects_bad_config_before_any_work():
    proc = run_cli("pretrain", "configs/demo/pretrain.yaml", "objective.mmm_ratio=2")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("vidray pretrain: config key 'objective.mmm_ratio': "
                                   "must be <= 1.0, got 2.0")


def test_cli_print_config_is_loadable(tmp_path):
    proc = run_cli("pretrain", "configs/demo/pretrain.yaml", "objective.mmm_ratio=0.3", "--print-config")
    assert proc.returncode == 0, proc.stderr
    saved = tmp_path / "resolved.yaml"
    saved.write_text(proc.stdout)
    assert load_config(PretrainConfig, str(saved)).objective.mmm_ratio == 0.3


def test_the_presets_ship_inside_the_package_and_resolve_by_name_from_any_directory(tmp_path):
    """configs/ is a link to the package's presets (what `vidray demo` runs): a user of the
    installed package names one, with or without configs/ and .yaml, from wherever they are."""
    from vidray.config import PRESETS_DIR, preset, preset_names

    assert os.path.realpath(os.path.join(REPO, "configs")) == os.path.realpath(PRESETS_DIR)
    on_disk = sorted(os.path.relpath(p, os.path.join(REPO, "configs")) for p in glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")))
    assert preset_names() == on_disk and "demo/pretrain.yaml" in on_disk
    assert preset("configs/demo/pretrain") == preset("demo/pretrain.yaml") == os.path.join(PRESETS_DIR, "demo",
                                                                                            "pretrain.yaml")
    for name in ("demo/allinone_pretrain", "configs/demo/allinone_pretrain.yaml"):
        proc = run_cli("pretrain", name, "--print-config", cwd=tmp_path)  # no configs/ here
        assert proc.returncode == 0, proc.stderr
        assert "arch: allinone" in proc.stdout and "steps: 300" in proc.stdout
    with pytest.raises(ConfigError, match=r"no preset 'demo/nope'; the presets are: demo/allinone_finetune_qa.yaml"):
        preset("demo/nope")


def test_cli_missing_config_file_is_one_clear_line():
    proc = run_cli("pretrain", "configs/nope.yaml")
    assert proc.returncode == 2
    assert "configs/nope.yaml" in proc.stderr and "no such file" in proc.stderr
