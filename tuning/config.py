"""The typed config of `vidray sweep`: the trials' job configs, the search space, the scheduler.

A sweep's trial is the real pre-training job (optionally followed by fine-tuning and evaluation
of its checkpoint); ``pretrain``, ``finetune`` and ``evaluate`` hold those jobs' configs with the
same keys as `vidray pretrain|finetune|evaluate`. The search space addresses them by the same
dotted paths as overrides (see :mod:`vidray.tuning.space`).

``pretrain.model.arch`` (an arch of :data:`vidray.archs.ARCH_JOBS`) picks the schema
of ``pretrain`` and ``finetune`` when the sweep is loaded: a frames-model sweep holds a
``FramesPretrainConfig`` / ``FramesFinetuneConfig``, a VLM one ``PretrainConfig`` / ``FinetuneConfig``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from vidray import archs
from vidray.config import ConfigError, from_dict, merge, option
from vidray.config.train import EvaluateConfig, PretrainConfig
from vidray.tracking import MLflowConfig

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
                           "from the config", name=True)
    # Typed Any because the schema depends on a value (pretrain.model.arch) and from_dict has no
    # tagged unions: the raw mappings pass through it and __post_init__ builds the arch's configs.
    pretrain: Any = option(default_factory=PretrainConfig, help=(
        "the trials' pre-training job: the keys of `vidray pretrain`; its model.arch "
        f"({', '.join(archs.ARCH_JOBS['pretrain'])}) picks the schema of pretrain.* and finetune.*"))
    finetune: Any = option(
        None, "fine-tune each trial's checkpoint (the keys of `vidray finetune` for pretrain's "
              "model.arch; model.* and empty data.* come from pretrain) and evaluate it (see "
              "evaluate); null = pre-training only")
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
    max_failures: int = option(1, "times a failed trial starts again (a lost node, a killed worker): it "
                                  "resumes from its own last checkpoint into the same MLflow run; a "
                                  "trial that fails on its values fails again and is reported failed", ge=0)
    time_budget_s: float = option(0.0, "stop every trial after this many seconds; 0 = no limit", ge=0.0)
    storage_path: str = option("runs/sweeps", "root of the sweep folders (Tune state, trial "
                                              "checkpoints); local path or s3://")
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def __post_init__(self) -> None:
        self.pretrain = _job_config("pretrain", self.arch, self.pretrain)
        if self.finetune is not None:
            self.finetune = _job_config("finetune", self.arch, _with_arch(self.finetune, self.arch))

    @property
    def arch(self) -> str:
        """The trials' architecture (``pretrain.model.arch``)."""
        if isinstance(self.pretrain, dict):
            return archs.arch_of_dict(self.pretrain)
        return self.pretrain.model.arch

    def validate(self) -> None:
        if not self.space:
            raise ConfigError("space", "is empty: name at least one config path to sweep, e.g. "
                              "space: {objective.mmm_ratio: {grid: [0.0, 0.3, 0.5, 0.7]}}")
        if self.finetune is not None:
            _same_arch(self.finetune.model.arch, self.arch)
        reported = pretrain_metrics(self.arch)
        if self.finetune is None and self.metric not in reported:
            raise ConfigError("metric", f"{self.metric!r} is not reported by {self.arch} pre-training "
                              f"({', '.join(reported)}); add a finetune: stage for "
                              "evaluation metrics")

        if self.scheduler.name == "asha" and self.scheduler_metric not in reported:
            raise ConfigError("scheduler.metric", f"ASHA acts during pre-training, which for {self.arch} "
                              f"reports {', '.join(reported)}; got {self.scheduler_metric!r}")
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


def _job_config(job: str, arch: str, value: Any):
    """The typed ``job`` config of ``arch`` from its raw mapping (a typed one is kept); errors
    name the sweep's key (``pretrain.model.arch``, ``finetune.optim.lr``, ...)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value
    if not isinstance(value, dict):
        raise ConfigError(job, f"expected a mapping of `vidray {job}` keys, got {value!r}")
    try:
        return from_dict(archs.config_class(job, arch), value)
    except ConfigError as err:
        raise ConfigError(f"{job}.{err.key}", err.message) from None


def _with_arch(finetune: Any, arch: str) -> Any:
    """A raw ``finetune`` with pretrain's arch when it names none: each trial fine-tunes its own
    pre-training checkpoint, so the model is the pre-training one (trial_configs copies model.*)."""
    if not isinstance(finetune, dict) or not isinstance(finetune.get("model", {}), dict):
        return finetune
    _same_arch(finetune.get("model", {}).get("arch", arch), arch)
    return merge(finetune, {"model": {"arch": arch}})


def _same_arch(finetune_arch: str, arch: str) -> None:
    if finetune_arch != arch:
        raise ConfigError("finetune.model.arch", f"is {finetune_arch!r}, but pretrain.model.arch is "
                          f"{arch!r}: each trial fine-tunes its own pre-training checkpoint")


# What each architecture's pre-training reports to Tune (train.val_every > 0 adds the val_* ones:
# the loop's validation pass prefixes the system's validation_step names with "val_"). Metrics the
# loop adds to every step (lr, grad_norm, examples_per_s) are not listed: nothing to select on.
VLM_PRETRAIN_METRICS = ("val_loss", "val_loss_video", "val_loss_text", "val_acc_video", "val_acc_text",
                        "loss", "loss_video", "loss_text", "acc_video", "acc_text")
FRAMES_PRETRAIN_METRICS = ("val_loss", "val_mlm_loss", "val_vtm_loss", "val_vtm_accuracy",
                           "loss", "mlm_loss", "vtm_loss", "vtm_accuracy")
# E-ViLM adds masked video modelling when objective.mvm_tokenizer is not none.
EVILM_PRETRAIN_METRICS = FRAMES_PRETRAIN_METRICS + ("val_mvm_loss", "val_mvm_accuracy", "mvm_loss", "mvm_accuracy")


def pretrain_metrics(arch: str) -> tuple[str, ...]:
    """The metrics ``arch``'s pre-training reports (a sweep's metric and ASHA's pick from them):
    VLM's, or a frames model's (with MVM's where it can pre-train with masked video modelling)."""
    if arch == archs.DEFAULT_ARCH:
        return VLM_PRETRAIN_METRICS
    return EVILM_PRETRAIN_METRICS if archs.frames_arch(arch).masked_video else FRAMES_PRETRAIN_METRICS


# --- what a sweep derives from its config (the sweep and its report both read it) ------------

ERROR_TAG = "vidray.error"


def experiment_of(cfg: SweepConfig) -> str:
    return cfg.mlflow.experiment or EXPERIMENT


def stage_storage(cfg: SweepConfig) -> str:
    """Where the trials' TorchTrainers checkpoint (inside the sweep's folder)."""
    root = cfg.storage_path if "://" in cfg.storage_path else os.path.abspath(cfg.storage_path)
    return f"{root.rstrip('/')}/{cfg.name}/train"


def forced_settings(cfg: SweepConfig, trial_id: str) -> dict[str, dict]:
    """What the sweep sets on every trial's jobs: stable run names, storage, MLflow."""
    mlflow = {"tracking_uri": cfg.mlflow.resolved_uri(), "experiment": experiment_of(cfg)}
    storage = stage_storage(cfg)
    return {"pretrain": {"train": {"run_name": f"{cfg.name}-{trial_id}", "storage_path": storage},
                         "mlflow": mlflow},
            "finetune": {"train": {"run_name": f"{cfg.name}-{trial_id}-ft", "storage_path": storage},
                         "mlflow": mlflow}}


def mlflow_client(sweep: SweepConfig):
    """An MLflow client on the sweep's tracking server (MLflow imported on use: `--help` stays fast)."""
    import mlflow

    if sweep.mlflow.resolved_uri():
        mlflow.set_tracking_uri(sweep.mlflow.resolved_uri())
    return mlflow.MlflowClient()
