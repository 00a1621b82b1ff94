"""The model architectures, picked by ``model.arch``: plain dicts, nothing imported until used.

`vidray pretrain|finetune` and `vidray sweep` read a config's ``model.arch`` (``vlm`` when unset)
and look its job config class and runner up here; `vidray evaluate` follows the checkpoint's
``model.arch`` to its evaluator. Entries are dotted ``module:name`` strings imported on use, so
reading the registry stays instant (no torch) and `--help` does not wait.

**Adding a frames model** (one that trains on clips of frames, as All-in-one does) is one file and
one line in :data:`FRAMES_ARCHS`: the file defines ``build(model_cfg, vocab_size, num_answers) ->
nn.Module`` and its network follows the contract of its recipe (``allinone``: a backbone with
``hidden_size`` and ``forward(frames, text_ids, text_mask) -> [CLS, text..., video...] states``,
wrapped in ``AllInOneHeads``); pre-training, fine-tuning, evaluation, sweeps and the CLI then take
it as they take All-in-one. ``vidray.models.example`` is such a model (docs/layout.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from vidray.config import ConfigError


@dataclass(frozen=True)
class FramesArch:
    """What the frames path needs to know of one architecture."""

    build: str                   # "module:function": (FramesModelConfig, vocab_size, num_answers) -> nn.Module
    recipe: str = "allinone"     # how it pre-trains, fine-tunes and is scored: a key of RECIPE_TASKS
    masked_video: bool = False   # pre-training may add masked video modelling (objective.mvm_tokenizer)
    token_rolling: bool = False  # model.temporal_roll=false is its ablation


# model.arch -> the frames model. The recipes are the frames path's systems and scorers
# (vidray.train.frames_system.RECIPES): "allinone" trains MLM + video-text matching, then contrastive
# retrieval on separate passes or a QA classifier on a joint one; "lavender" does every task as MLM
# through the one MLM head.
FRAMES_ARCHS: dict[str, FramesArch] = {
    "allinone": FramesArch("vidray.models.allinone:build", token_rolling=True),
    "lavender": FramesArch("vidray.models.lavender:build", recipe="lavender"),
    "evilm": FramesArch("vidray.models.evilm:build", masked_video=True),
    "example": FramesArch("vidray.models.example:build"),
}

# recipe -> the fine-tuning tasks it trains (FramesFinetuneConfig.task).
RECIPE_TASKS: dict[str, tuple[str, ...]] = {
    "allinone": ("retrieval", "qa"),
    "lavender": ("retrieval", "qa", "mc", "multi"),
}

_FRAMES_JOBS = {
    "pretrain": ("vidray.config.frames:FramesPretrainConfig", "vidray.train.frames_run:run_frames_pretrain"),
    "finetune": ("vidray.config.frames:FramesFinetuneConfig", "vidray.train.frames_run:run_frames_finetune"),
}

# job -> model.arch -> ("module:ConfigClass", "module:runner"). A runner takes
# ``(cfg, say=print, tags=None)``; pre-training runners also take ``callbacks`` (Ray Train's,
# e.g. a sweep's TuneReportCallback).
ARCH_JOBS: dict[str, dict[str, tuple[str, str]]] = {
    "pretrain": {"vlm": ("vidray.config.train:PretrainConfig", "vidray.train.vlm_pretrain:run_pretrain"),
                 **{arch: _FRAMES_JOBS["pretrain"] for arch in FRAMES_ARCHS}},
    "finetune": {"vlm": ("vidray.config.train:FinetuneConfig", "vidray.train.vlm_finetune:run_finetune"),
                 **{arch: _FRAMES_JOBS["finetune"] for arch in FRAMES_ARCHS}},
}

# model.arch of a fine-tuning checkpoint -> "module:evaluator" of `vidray evaluate`; an evaluator
# takes ``(cfg: EvaluateConfig, state, say=print, tags=None)`` with the checkpoint's state loaded.
EVALUATORS: dict[str, str] = {
    "vlm": "vidray.eval.vlm:run_vlm_evaluate",
    **{arch: "vidray.eval.frames:run_frames_evaluate" for arch in FRAMES_ARCHS},
}

DEFAULT_ARCH = "vlm"


def frames_arch(arch: str) -> FramesArch:
    """The registry entry of a frames model; ConfigError naming ``model.arch`` when unknown."""
    if arch not in FRAMES_ARCHS:
        raise ConfigError("model.arch", f"unknown frames architecture {arch!r}; choose one of "
                          f"{', '.join(FRAMES_ARCHS)}")
    return FRAMES_ARCHS[arch]


def load(dotted: str) -> Any:
    """The object a ``module:name`` string names."""
    module, name = dotted.split(":")
    return getattr(importlib.import_module(module), name)


def arch_of_dict(raw: dict | None) -> str:
    """``model.arch`` of a raw (not yet typed) job config; ``vlm`` when unset."""
    model = (raw or {}).get("model") or {}
    return model.get("arch", DEFAULT_ARCH) if isinstance(model, dict) else DEFAULT_ARCH


def _entry(job: str, arch: str) -> tuple[str, str]:
    archs = ARCH_JOBS[job]
    if arch not in archs:
        raise ConfigError("model.arch", f"unknown architecture {arch!r}; choose one of {', '.join(archs)}")
    return archs[arch]


def config_class(job: str, arch: str) -> type:
    """The typed config class of ``job`` ("pretrain" | "finetune") for ``arch``; ConfigError naming
    ``model.arch`` when the architecture is unknown."""
    return load(_entry(job, arch)[0])


def runner(job: str, arch: str) -> Callable[..., dict]:
    """The function that runs ``job`` for ``arch`` (returns the job's report)."""
    return load(_entry(job, arch)[1])


def evaluator(arch: str) -> Callable[..., dict]:
    """The evaluation of fine-tuning checkpoints of ``arch``; ConfigError naming ``checkpoint`` when
    no evaluator knows it."""
    if arch not in EVALUATORS:
        raise ConfigError("checkpoint", f"holds a {arch!r} model, which no evaluator knows; known: "
                          f"{', '.join(EVALUATORS)}")
    return load(EVALUATORS[arch])
