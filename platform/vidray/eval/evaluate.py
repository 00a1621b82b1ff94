"""`vidray evaluate`: a fine-tuning checkpoint scored on a split by its model's evaluator.

The checkpoint says which model it holds (``model.arch`` of its config); :data:`vidray.archs.EVALUATORS`
names the evaluator (VLM: :mod:`vidray.eval.vlm`; the frames models: :mod:`vidray.eval.frames`).
Every evaluation is one MLflow run (:mod:`vidray.eval.report`).
"""

from __future__ import annotations

from typing import Any, Callable

from vidray import archs
from vidray.checkpoint import load_state
from vidray.config import ConfigError
from vidray.config.train import EvaluateConfig


def run_evaluate(cfg: EvaluateConfig, say: Callable[[str], None] = print,
                 tags: dict | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint``; ``tags`` go on the MLflow run (a sweep's trial nests it under its own run)."""
    if not cfg.checkpoint:
        raise ConfigError("checkpoint", "is required: a fine-tuning checkpoint folder "
                          "(printed by `vidray finetune`)")
    state = load_state(cfg.checkpoint)
    arch = state["config"].get("model", {}).get("arch", archs.DEFAULT_ARCH)
    return archs.evaluator(arch)(cfg, state, say, tags)
