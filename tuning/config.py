"""The typed config of `vidray sweep`: the trials' job configs, the search space, the scheduler.

A sweep's trial is the real pre-training job (optionally followed by fine-tuning and evaluation
of its checkpoint); ``pretrain``, ``finetune`` and ``evaluate`` hold those jobs' configs with the
same keys as `vidray pretrain|finetune|evaluate`. The search space addresses them by the same
dotted paths as overrides (see :mod:`vidray.tuning.space`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from vidray.config import ConfigError, option
from vidray.tracking import MLflowConfig
from vidray.train.config import EvaluateConfig, FinetuneConfig, PretrainConfig

EXPERIMENT = "vidray-sweep"


@dataclass
class SchedulerConfig:
    name: Literal["asha", "none"] = option(
        "asha", "asha: at each rung (grace_period x reduction_factor^k steps) stop the trials "
                "outside the best 1/reduction_factor; none: run every trial to the end")
    metric: str = option("", "metric ASHA compares, reported during pre-training (e.g. val_loss); "
                             "empty = the sweep's metric")
    mode: Optional[Literal["min", "max"]] = option(None, "min or max for scheduler.metric; "
                                                         "null = the sweep's mode")
    grace_period: int = option(20, "steps every trial runs before it can be stopped", ge=1)
    reduction_factor: float = option(2.0, "ASHA keeps the best 1/reduction_factor at each rung", gt=1.0)


@dataclass
class SweepConfig:
    """`vidray sweep`: Ray Tune over trials of the real jobs, one MLflow child run per trial."""

    name: str = option("", "sweep name: names the parent MLflow run, the trials' runs and the Tune "
                           "folder; `--resume` continues the sweep of this name; empty = derived "
                           "from the config")
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: Optional[FinetuneConfig] = option(
        None, "fine-tune each trial's checkpoint (model.* and empty data.* come from pretrain) and "
              "evaluate it (see evaluate); null = pre-training only")
    evaluate: EvaluateConfig = field(default_factory=lambda: EvaluateConfig(split="val"))
    space: dict[str, Any] = option(default_factory=dict, help=(
        "dotted config path -> {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | "
        "{loguniform: [lo, hi]}; paths are pre-training keys (objective.mmm_ratio) unless they "
        "start with finetune.; a grid/choice value that is a mapping of paths sets them together"))
    num_samples: int = option(1, "repeats of the grid; samples drawn from choice/uniform", ge=1)
    metric: str = option("val_loss", "the trial metric that picks the best trial (val_loss from "
                                     "pre-training, or an evaluation metric such as t2v_R1)")
    mode: Literal["min", "max"] = option("min", "whether the best trial minimises or maximises metric")
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_concurrent_trials: int = option(0, "trials at once; 0 = as many as the cluster's CPUs (and "
                                           "GPUs) hold", ge=0)
    time_budget_s: float = option(0.0, "stop every trial after this many seconds; 0 = no limit", ge=0.0)
    storage_path: str = option("runs/sweeps", "root of the sweep folders (Tune state, trial "
                                              "checkpoints); local path or s3://")
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def validate(self) -> None:
        if not self.space:
            raise ConfigError("space", "is empty: name at least one config path to sweep, e.g. "
                              "space: {objective.mmm_ratio: {grid: [0.0, 0.3, 0.5, 0.7]}}")
        if self.finetune is None and self.metric not in PRETRAIN_METRICS:
            raise ConfigError("metric", f"{self.metric!r} is not reported by pre-training "
                              f"({', '.join(PRETRAIN_METRICS)}); add a finetune: stage for "
                              "evaluation metrics")

        if self.scheduler.name == "asha" and self.scheduler_metric not in PRETRAIN_METRICS:
            raise ConfigError("scheduler.metric", f"ASHA acts during pre-training, which reports "
                              f"{', '.join(PRETRAIN_METRICS)}; got {self.scheduler_metric!r}")
        uses_val = [m for m in (self.metric, self.scheduler_metric) if m.startswith("val_")]
        if uses_val and not self.pretrain.train.val_every:
            raise ConfigError("pretrain.train.val_every", f"must be > 0: {uses_val[0]} is measured "
                              "on data.val_split every train.val_every steps")

    @property
    def scheduler_metric(self) -> str:
        return self.scheduler.metric or self.metric

    @property
    def scheduler_mode(self) -> str:
        return self.scheduler.mode or self.mode


# What pre-training reports to Tune (train.val_every > 0 adds the val_* ones).
PRETRAIN_METRICS = ("val_loss", "val_loss_video", "val_loss_text", "val_acc_video", "val_acc_text",
                    "loss", "loss_video", "loss_text", "acc_video", "acc_text")
