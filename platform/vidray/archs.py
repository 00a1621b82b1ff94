"""The model architectures and the job config class + runner of each, picked by ``model.arch``.

`vidray pretrain|finetune` and `vidray sweep` read a config's ``model.arch`` (``vlm`` when unset)
and look its classes up here. Entries are dotted ``module:name`` strings imported on use, so
reading the registry stays instant (no torch) and `--help` does not wait. A new architecture is one
entry per job below and one evaluator (`vidray evaluate` follows the checkpoint's ``model.arch``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from vidray.config import ConfigError

# job -> model.arch -> ("module:ConfigClass", "module:runner"). A runner takes
# ``(cfg, say=print, tags=None)``; pre-training runners also take ``callbacks`` (Ray Train's,
# e.g. a sweep's TuneReportCallback).
ARCH_JOBS: dict[str, dict[str, tuple[str, str]]] = {
    "pretrain": {
        "vlm": ("vidray.train.config:PretrainConfig", "vidray.vlm.pretrain:run_pretrain"),
        "allinone": ("vidray.frames.config:FramesPretrainConfig", "vidray.frames.run:run_frames_pretrain"),
        "lavender": ("vidray.frames.config:FramesPretrainConfig", "vidray.frames.run:run_frames_pretrain"),
        "evilm": ("vidray.frames.config:FramesPretrainConfig", "vidray.frames.run:run_frames_pretrain"),
    },
    "finetune": {
        "vlm": ("vidray.train.config:FinetuneConfig", "vidray.vlm.finetune:run_finetune"),
        "allinone": ("vidray.frames.config:FramesFinetuneConfig", "vidray.frames.run:run_frames_finetune"),
        "lavender": ("vidray.frames.config:FramesFinetuneConfig", "vidray.frames.run:run_frames_finetune"),
        "evilm": ("vidray.frames.config:FramesFinetuneConfig", "vidray.frames.run:run_frames_finetune"),
    },
}

# model.arch of a fine-tuning checkpoint -> "module:evaluator" of `vidray evaluate`; an evaluator
# takes ``(cfg: EvaluateConfig, state, say=print, tags=None)`` with the checkpoint's state loaded.
EVALUATORS: dict[str, str] = {
    "vlm": "vidray.vlm.evaluate:run_vlm_evaluate",
    "allinone": "vidray.frames.run:run_frames_evaluate",
    "lavender": "vidray.frames.run:run_frames_evaluate",
    "evilm": "vidray.frames.run:run_frames_evaluate",
}

DEFAULT_ARCH = "vlm"


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
