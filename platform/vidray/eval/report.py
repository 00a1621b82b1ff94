"""What every evaluator reports: the MLflow run of an evaluation and its plots.

One run per `vidray evaluate` (experiment ``vidray-evaluate`` unless ``mlflow.experiment``): the
metrics, a per-item table per task (MLflow's table view), plots (recall@K, per-type bars).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vidray.config import dump_yaml, flatten
from vidray.eval.metrics import ranks_of_correct
from vidray.tracking import use_experiment

EXPERIMENT = "vidray-evaluate"


def recall_curve_figure(similarity: np.ndarray, title: str):
    """Recall@K for K = 1..N in both directions, next to chance (K / N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(similarity)
    ks = np.arange(1, n + 1)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, matrix in (("text → video", similarity), ("video → text", similarity.T)):
        ranks = ranks_of_correct(matrix)
        ax.plot(ks, [(ranks <= k).mean() for k in ks], label=label)
    ax.plot(ks, ks / n, "k--", label="chance")
    ax.set(xlabel="K", ylabel="recall@K", title=title, xscale="log" if n > 50 else "linear", ylim=(0, 1.02))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def bar_figure(values: dict[str, float], title: str, ylabel: str):
    """One bar per name: caption scores, per-class or per-question-type accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(values)), 3.6))
    ax.bar(list(values), list(values.values()))
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def log_evaluation(cfg, ft, metrics: dict, tables: dict[str, list[dict]],
                   figures: dict[str, Any], notes: dict, extra_tags: dict) -> str:
    """One MLflow run of an evaluation (``cfg``: its EvaluateConfig, ``ft``: the checkpoint's
    fine-tuning config, VLM's or a frames model's): params of both, metrics, a table per task
    (``eval/<split>/<name>.json``), plots, notes; its run id."""
    import mlflow  # imported on use: the CLI's --help stays fast

    if cfg.mlflow.resolved_uri():
        mlflow.set_tracking_uri(cfg.mlflow.resolved_uri())
    use_experiment(cfg.mlflow.experiment or EXPERIMENT)
    # Named by what tells two evaluations apart in the runs list: the pre-training they start from.
    init = ft.init_from.rstrip("/") if ft.init_from else ""
    run_name = extra_tags.get("mlflow.runName") or f"evaluate-{ft.task}-{cfg.split}-" + (
        f"from-{os.path.basename(os.path.dirname(init))}" if init else "no-pretrain")
    tags = {"job": "evaluate", "task": ft.task, "split": cfg.split, "checkpoint_uri": cfg.checkpoint,
            "finetune_run_name": ft.train.run_name or os.path.basename(os.path.dirname(cfg.checkpoint.rstrip("/"))),
            **extra_tags}
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params({**flatten(cfg), **{f"finetune.{k}": v for k, v in flatten(ft).items()}})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        for name, rows in tables.items():
            if rows:
                mlflow.log_table(data={k: [r[k] for r in rows] for k in rows[0]},
                                 artifact_file=f"eval/{cfg.split}/{name}.json")
        for name, fig in figures.items():
            mlflow.log_figure(fig, f"eval/{cfg.split}/{name}.png")
        mlflow.log_text(dump_yaml(cfg), "evaluate_config.yaml")
        if notes:
            mlflow.log_dict(notes, f"eval/{cfg.split}/notes.json")
        return run.info.run_id
