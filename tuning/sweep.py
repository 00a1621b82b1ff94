"""`vidray sweep`: Ray Tune over trials that each run the real jobs, tracked as nested MLflow runs.

    sweep driver ── parent MLflow run (space, scheduler, best trial, best config, report)
      └─ Tune trial (a function) ── child MLflow run (the trial's params, curves, final metrics)
           ├─ TorchTrainer: pre-training, results -> Tune (TuneReportCallback) -> ASHA
           └─ optional: fine-tuning + evaluation of its checkpoint (runs nested under the child)

Names are stable: the sweep's name (given or derived from its config) names the Tune folder and
the parent run, and a trial's runs are ``<sweep>-<trial id>``. So `--resume` restores the Tune
state, skips finished trials, and a restarted trial's TorchTrainer resumes from its own last
checkpoint into the same MLflow run (the curves continue; nothing is logged twice). The same
holds for a trial Tune starts again after it failed (``max_failures``: a lost node takes the trial
with it), on whatever node has room.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

from vidray import storage
from vidray.archs import runner
from vidray.cluster import verbose
from vidray.config import ConfigError, dump_yaml, flatten, from_dict, merge, parse_overrides, read_yaml
from vidray.feature_store.store import digest
from vidray.tracking import alive_nodes, decide_tracking_uri, find_run, use_experiment
from vidray.tuning.config import SweepConfig, experiment_of, forced_settings, mlflow_client
from vidray.tuning.report import finish_sweep
from vidray.tuning.space import check, overrides_of, trial_configs, tune_space


def load_sweep(path: str | None, overrides: list[str]) -> SweepConfig:
    """The sweep config at ``path`` with ``overrides``; ``space.<dotted path>=SPEC`` keeps the
    dotted path as one key (``space.objective.mmm_ratio={grid: [0.0, 0.5]}``)."""
    space_items = [o for o in overrides if o.startswith("space.")]
    data = merge(read_yaml(path) if path else {},
                 parse_overrides([o for o in overrides if not o.startswith("space.")]))
    for item in space_items:
        key, _, raw = item.partition("=")
        data.setdefault("space", {})
        data["space"] = {**data["space"], key[len("space."):]: parse_overrides([f"x={raw}"])["x"]}
    cfg = from_dict(SweepConfig, data)
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name="sweep-" + digest(dataclasses.asdict(cfg))[:8])
    return cfg


def _storage(cfg: SweepConfig):
    """(pyarrow filesystem or None, path) of the sweep's folder root."""

    if storage.is_remote(cfg.storage_path):
        return storage.arrow_filesystem(cfg.storage_path)
    return None, os.path.abspath(cfg.storage_path)


# --- the trial -------------------------------------------------------------------------------

def run_trial(params: dict, sweep: SweepConfig, parent_run_id: str) -> None:
    """One trial, in a Tune worker: the real pre-training (results streamed to Tune for ASHA), then
    fine-tuning + evaluation when configured; its MLflow child run holds all of it. Errors are left
    to Tune, which records them; the driver marks the child FAILED at the end (a trial ASHA stops
    also sees an error here, from its killed trainer, and must not be marked failed)."""
    import mlflow
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    ray.data.DataContext.get_current().enable_progress_bars = False  # Tune's table is the progress
    client = mlflow_client(sweep)
    run_id = _child_run(client, sweep, trial_id, params, parent_run_id)
    # Where this try of the trial runs (a retry after a lost node runs elsewhere); its Train
    # workers' nodes go in ray.worker_nodes.
    client.set_tag(run_id, "ray.trial_node", ray.get_runtime_context().get_node_id())
    try:
        pretrain, finetune = trial_configs(sweep, params, forced_settings(sweep, trial_id))
    except ConfigError:  # the trial's own values, so the failed run still shows what was tried
        _log_params(client, run_id, {path: str(v) for key, value in params.items()
                                     for path, v in overrides_of(key, value)})
        raise
    _log_params(client, run_id, {**flatten(pretrain),
                                 **({f"finetune.{k}": v for k, v in flatten(finetune).items()}
                                    if finetune else {})})

    # The trial's own arch (a space may sweep allinone vs lavender), as `vidray pretrain` picks it.
    run_pretrain = runner("pretrain", pretrain.model.arch)
    report = run_pretrain(pretrain, tags={"mlflow.parentRunId": parent_run_id},
                          callbacks=(TuneReportCallback(),), say=_to_stderr)
    final = {"step": report["metrics"]["step"],
             **{k: v for k, v in report["metrics"].items() if k.startswith("val_")}}
    if finetune is not None:
        final.update(_finetune_and_evaluate(sweep, finetune, report["checkpoint"], run_id, trial_label(params)))
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), _now(), final["step"])
                                          for k, v in final.items()
                                          if k != "step" and isinstance(v, (int, float))])
    tune.report({**final, "trial_done": 1})


def trial_label(params: dict) -> str:
    """A trial's swept values as its runs are named in MLflow's runs list (``mmm_ratio=0.5``):
    Tune's trial ids tell trials apart, not what they tried."""
    return ", ".join(f"{path.rsplit('.', 1)[-1]}={value}" for key, sampled in params.items()
                     for path, value in overrides_of(key, sampled))


def _finetune_and_evaluate(sweep: SweepConfig, finetune, checkpoint: str, parent: str, label: str) -> dict:
    from vidray.eval.evaluate import run_evaluate  # follows the checkpoint to VLM or a frames model

    run_finetune = runner("finetune", finetune.model.arch)
    finetune = dataclasses.replace(finetune, init_from=checkpoint)
    nested = {"mlflow.parentRunId": parent}
    tuned = run_finetune(finetune, tags={**nested, "mlflow.runName": f"finetune {label}"}, say=_to_stderr)
    evaluate = dataclasses.replace(sweep.evaluate, checkpoint=tuned["checkpoint"],
                                   mlflow=dataclasses.replace(sweep.evaluate.mlflow,
                                                              tracking_uri=sweep.mlflow.resolved_uri(),
                                                              experiment=experiment_of(sweep)))
    result = run_evaluate(evaluate, tags={**nested, "mlflow.runName": f"evaluate {label}"}, say=_to_stderr)
    return {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _now() -> int:
    return int(time.time() * 1000)


def _child_run(client, sweep: SweepConfig, trial_id: str, params: dict, parent_run_id: str) -> str:
    """The trial's MLflow run, found by its stable name (a restarted trial continues it). The
    pre-training job finds the same run by the same ``vidray.run_name`` tag and logs into it."""
    name = f"{sweep.name}-{trial_id}"
    found = find_run(sweep.mlflow.resolved_uri(), experiment_of(sweep), name)
    if found:
        return found.info.run_id
    experiment_id = client.get_experiment_by_name(experiment_of(sweep)).experiment_id
    run = client.create_run(experiment_id, run_name=f"{trial_label(params)} ({trial_id})", tags={
        "vidray.run_name": name, "mlflow.parentRunId": parent_run_id, "job": "sweep-trial",
        "vidray.sweep": sweep.name, "vidray.trial_id": trial_id,
        "vidray.trial_params": json.dumps(params, default=str)[:5000]})
    return run.info.run_id


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Params of a run, once: a resumed trial finds them already there (MLflow refuses a change)."""
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    fresh = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
    for i in range(0, len(fresh), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=fresh[i:i + 100])


# --- the driver ------------------------------------------------------------------------------

def concurrency(cfg: SweepConfig, resources: dict) -> int:
    """Trials at once: each holds 1 CPU (the trial) + its Train workers' CPUs (and GPUs), and one
    CPU stays free for the Ray Data tasks that feed them."""
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    workers = cfg.pretrain.train.num_workers
    by_cpu = int(resources.get("CPU", 1) - 1) // (1 + workers)
    if cfg.pretrain.train.use_gpu:
        by_cpu = min(by_cpu, int(resources.get("GPU", 0)) // workers)
    return max(1, by_cpu)


def _parent_run(cfg: SweepConfig, resume: bool) -> str:
    """The sweep's parent run: created with the space and scheduler as params, or found again."""
    client = mlflow_client(cfg)
    experiment_id = use_experiment(experiment_of(cfg))
    found = client.search_runs([experiment_id], filter_string=f"tags.`vidray.sweep_parent` = '{cfg.name}'",
                               max_results=1)
    if found and not resume:
        raise ConfigError("name", f"sweep {cfg.name!r} already exists (MLflow run {found[0].info.run_id}): "
                          "pass --resume to continue it, or set name=... for a new sweep")
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=cfg.name, tags={
        "vidray.sweep_parent": cfg.name, "vidray.sweep": cfg.name, "job": "sweep"})
    params = {**{f"space.{k}": json.dumps(v) for k, v in cfg.space.items()},
              **{f"scheduler.{k}": str(v) for k, v in dataclasses.asdict(cfg.scheduler).items()},
              "metric": cfg.metric, "mode": cfg.mode, "num_samples": str(cfg.num_samples),
              "time_budget_s": str(cfg.time_budget_s), "finetune": str(cfg.finetune is not None)}
    _log_params(client, run.info.run_id, params)
    client.log_text(run.info.run_id, dump_yaml(cfg), "sweep.yaml")
    return run.info.run_id


def _scheduler(cfg: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler.name == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", metric=cfg.scheduler_metric, mode=cfg.scheduler_mode,
                         max_t=cfg.pretrain.train.steps, grace_period=cfg.scheduler.grace_period,
                         reduction_factor=cfg.scheduler.reduction_factor,
                         stop_last_trials=False)  # a trial at max_t still fine-tunes and evaluates


def run_sweep(cfg: SweepConfig, resume: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or with ``resume``, continue) the sweep; returns the report (trials, best trial)."""
    import ray
    from ray import tune

    from vidray.train.job import ensure_ray

    problems = check(cfg)  # unknown paths and malformed entries raise before anything starts
    for problem in problems:
        say(f"sweep: warning: {problem} -- that trial will fail, the others go on")
    filesystem, root = _storage(cfg)
    path = f"{root.rstrip('/')}/{cfg.name}"
    exists = tune.Tuner.can_restore(path, storage_filesystem=filesystem)
    if exists and not resume:
        raise ConfigError("name", f"sweep {cfg.name!r} already exists at {path}: pass --resume to "
                          "continue it, or set name=... for a new sweep")
    if resume and not exists:
        raise ConfigError("name", f"no sweep {cfg.name!r} to resume at {path}; run without --resume "
                          "to start it")
    # Save Tune's state within a second of each change, so a killed sweep loses no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    ensure_ray(cfg.pretrain.train.num_workers)
    # Trials run on workers that may not share this process's environment: resolve MLflow here.
    uri = decide_tracking_uri(cfg.mlflow.resolved_uri(), experiment_of(cfg), alive_nodes())
    cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=uri))
    parent = _parent_run(cfg, resume)
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=cfg, parent_run_id=parent),
                                    {"cpu": 1})
    if exists:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=filesystem)
        say(f"sweep {cfg.name}: resuming from {path} (finished trials are kept)")
    else:
        parallel = concurrency(cfg, ray.cluster_resources())
        tuner = tune.Tuner(
            trainable, param_space=tune_space(cfg.space),
            tune_config=tune.TuneConfig(scheduler=_scheduler(cfg), num_samples=cfg.num_samples,
                                        max_concurrent_trials=parallel,
                                        time_budget_s=cfg.time_budget_s or None),
            run_config=tune.RunConfig(name=cfg.name, storage_path=root, storage_filesystem=filesystem,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      verbose=2 if verbose() else 1))
        stopping = (f"ASHA on {cfg.scheduler_mode} {cfg.scheduler_metric}" if cfg.scheduler.name == "asha"
                    else "no early stopping")
        say(f"sweep {cfg.name}: {_trial_count(cfg)} trial(s), {parallel} at a time, {stopping}; "
            f"Tune state in {path}; "
            f"MLflow parent run {parent}")
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables; stdout is the report
        results = tuner.fit()
    return finish_sweep(cfg, parent, results, say)


def _trial_count(cfg: SweepConfig) -> str:
    grid = [len(spec["grid"]) for spec in cfg.space.values() if "grid" in spec]
    return str(math.prod(grid) * cfg.num_samples)
