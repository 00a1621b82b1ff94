"""The training jobs of the frames models: pre-training, fine-tuning and the VQ tokenizer (``vidray
pretrain|finetune|train-vq`` dispatch here when ``model.arch`` is a frames model; their evaluation
is :func:`vidray.eval.frames.run_frames_evaluate`).

Same loop, checkpoints and MLflow runs as VLM (:mod:`vidray.train.job`); the runs also carry the
model's size figures (parameters, forward GFLOPs per clip) as params.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vidray.config import ConfigError
from vidray.config.frames import FINETUNE_TASKS, FramesFinetuneConfig, FramesPretrainConfig
from vidray.data.frames import (VQCodes, answer_vocabulary, clip_keys, examples_dataset, read_mc, read_qa,
                                skipped_videos_uri, source_tags, with_task_columns)
from vidray.data.manifest import split_videos
from vidray.models.build import measure_size, size_figures
from vidray.models.vq import VQ_FLAVOURS, VQTokenizer
from vidray.models.weights import text_tokenizer
from vidray.train.frames_system import VQTrainSystem, build_finetune_system, build_pretrain_system, mvm_settings
from vidray.train.job import run_name, run_training

PRETRAIN_EXPERIMENT, FINETUNE_EXPERIMENT = "vidray-pretrain", "vidray-finetune"


def run_frames_pretrain(cfg: FramesPretrainConfig, say=print, tags: dict | None = None,
                        callbacks: tuple = ()) -> dict[str, Any]:
    if cfg.train.val_every and not cfg.data.manifest:
        raise ConfigError("data.manifest", "is required with train.val_every > 0: it names the videos "
                          "of data.val_split")
    tags = {**source_tags(cfg.data), "arch": cfg.model.arch, **(tags or {})}
    mvm = mvm_settings(cfg)
    if mvm:
        tags.update({"feature_set.vq": mvm["uri"], "mvm_tokenizer": cfg.objective.mvm_tokenizer})
    figures = size_figures(cfg.model)
    say(f"{cfg.model.arch} ({cfg.model.flavour}): {figures['model.parameters']:,} parameters, "
        f"{figures['model.gflops_per_clip']} GFLOPs per clip"
        + (f"; MVM on {mvm['kind']} VQ codes ({mvm['codebook_size']} codes)" if mvm else ""))
    codes = []  # the codes go to the object store once Ray is up, shared by both datasets
    name = run_name(cfg, cfg.model.arch, "pretrain")

    def dataset(split: str):
        if mvm and not codes:
            codes.append(shared_vq_codes(mvm["uri"], cfg.model, cfg.data, say))
        return examples_dataset(cfg.model, cfg.data, split, vq=codes[0] if codes else None, say=say,
                                skipped_to=skipped_videos_uri(cfg.train.storage_path, name, split))

    return run_training(cfg, job="pretrain", experiment=cfg.mlflow.experiment or PRETRAIN_EXPERIMENT,
                        run_name=name, build_system=build_pretrain_system,
                        make_dataset=lambda: dataset(cfg.data.split),
                        make_val_dataset=lambda: dataset(cfg.data.val_split),
                        tags=tags, params=figures, callbacks=callbacks, say=say)


def shared_vq_codes(vq_uri: str, model, data, say=print):
    """The vq set's codes in Ray's object store (one copy per node), after checking that they
    cover the clips of the data (the frames set's, or the manifest's with data.source=videos):
    clips without codes would silently drop out of pre-training."""
    import ray

    codes = VQCodes.read(vq_uri)
    clips = clip_keys(model, data)
    missing = [k for k in clips if codes.get(*k) is None]
    if missing:
        source = data.frames if data.source == "frames" else data.manifest
        say(f"warning: {len(missing)} of {len(clips)} clips of {source} have no codes in {vq_uri} "
            f"(e.g. {missing[0][0]} clip {missing[0][1]}); they are left out of pre-training. Was the vq "
            "set extracted from a frames set of the same manifest?")
    return ray.put(codes)


def with_answers(cfg: FramesFinetuneConfig) -> FramesFinetuneConfig:
    """``cfg`` with ``answers`` filled from the training split's questions when empty (qa)."""
    if "qa" not in cfg.trained_tasks() or cfg.answers:
        return cfg
    answers = answer_vocabulary(read_qa(cfg.data.qa), split_videos(cfg.data.manifest, cfg.data.split))
    if not answers:
        raise ConfigError("data.qa", f"{cfg.data.qa} has no question about a video of split {cfg.data.split!r}")
    return dataclasses.replace(cfg, answers=answers)


def run_frames_finetune(cfg: FramesFinetuneConfig, say=print, tags: dict | None = None) -> dict[str, Any]:
    cfg.validate()  # a config built in code skips from_dict's check
    cfg = with_answers(cfg)
    tasks = cfg.trained_tasks()
    qa = read_qa(cfg.data.qa) if "qa" in tasks else None
    mc = read_mc(cfg.data.mc) if "mc" in tasks else None
    tags = {**source_tags(cfg.data), "arch": cfg.model.arch, "task": cfg.task,
            **({"tasks": ",".join(tasks)} if cfg.task == "multi" else {}),
            "init_from": str(cfg.init_from), **(tags or {})}
    figures = size_figures(cfg.model, len(cfg.answers))
    name = run_name(cfg, cfg.model.arch, cfg.task)
    skipped_to = skipped_videos_uri(cfg.train.storage_path, name, cfg.data.split)
    report = run_training(cfg, job="finetune", experiment=cfg.mlflow.experiment or FINETUNE_EXPERIMENT,
                          run_name=name, build_system=build_finetune_system,
                          make_dataset=lambda: finetune_dataset(cfg, qa, mc, skipped_to=skipped_to, say=say),
                          tags=tags, params=figures, say=say)
    return {**report, "task": cfg.task}


def finetune_dataset(cfg: FramesFinetuneConfig, qa: dict | None, mc: dict | None, **source):
    """The training examples of the run's task. task=multi: every task's examples in one dataset,
    each row tagged with its task and carrying every task's columns (:func:`with_task_columns`),
    shuffled once: the loop reads rows in order, so unshuffled the tasks would come one after the
    other instead of mixed in every batch. Each task's share of a batch is its share of the rows."""
    per_task = {"retrieval": {}, "qa": {"qa": qa, "answers": cfg.answers}, "mc": {"mc": mc}}
    if cfg.task != "multi":
        return examples_dataset(cfg.model, cfg.data, cfg.data.split, **per_task[cfg.task], **source)
    parts = [examples_dataset(cfg.model, cfg.data, cfg.data.split, **per_task[task], **source)
             .map_batches(with_task_columns, batch_format="numpy", fn_kwargs={"task": FINETUNE_TASKS.index(task)})
             for task in cfg.tasks]
    return parts[0].union(*parts[1:]).random_shuffle(seed=cfg.train.seed)


# --- the VQ video tokenizer (E-ViLM) ---------------------------------------------------------

VQ_EXPERIMENT = "vidray-vq-tokenizer"


def vq_size_figures(model_cfg) -> dict[str, float]:
    """Parameter count and the GFLOPs of coding one clip."""
    vocab = len(text_tokenizer(model_cfg.tokenizer))
    net = VQTokenizer(VQ_FLAVOURS[model_cfg.flavour], model_cfg, vocab)
    frames = torch.zeros(1, model_cfg.num_frames, 3, model_cfg.image_size, model_cfg.image_size)
    return measure_size(net, lambda: net.codes(frames))


def run_train_vq(cfg, say=print, tags: dict | None = None) -> dict[str, Any]:
    """Train a VQ video tokenizer (Ray Train, checkpoints, MLflow run) on the frames feature set, or
    on the manifest's videos decoded on the fly (``data.source=videos``)."""
    if cfg.model.flavour not in VQ_FLAVOURS:
        raise ConfigError("model.flavour", f"unknown flavour {cfg.model.flavour!r}; choose one of {sorted(VQ_FLAVOURS)}")
    tags = {**source_tags(cfg.data), "vq.kind": cfg.model.kind, **(tags or {})}
    if cfg.train.val_every and not cfg.data.manifest:
        raise ConfigError("data.manifest", "is required with train.val_every > 0")
    figures = vq_size_figures(cfg.model)
    say(f"VQ tokenizer ({cfg.model.kind}, {cfg.model.flavour}): {figures['model.parameters']:,} parameters, "
        f"{cfg.model.codebook_size} codes x {cfg.model.code_dim}, {figures['model.gflops_per_clip']} GFLOPs per clip")
    name = run_name(cfg, "vq", cfg.model.kind)

    def dataset(split: str):
        return examples_dataset(cfg.model, cfg.data, split, say=say,
                                skipped_to=skipped_videos_uri(cfg.train.storage_path, name, split))

    report = run_training(cfg, job="train-vq", experiment=cfg.mlflow.experiment or VQ_EXPERIMENT, run_name=name,
                          build_system=VQTrainSystem, make_dataset=lambda: dataset(cfg.data.split),
                          make_val_dataset=lambda: dataset(cfg.data.val_split),
                          tags=tags, params=figures, say=say)
    say(f"tokenizer checkpoint: {report['checkpoint']}  (cache its codes: `vidray extract` with "
        f"extractor: vq, vq.checkpoint: {report['checkpoint']})")
    return report
