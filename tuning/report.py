"""The end of a sweep: one row per trial, the best trial, MLflow statuses, the table and the plot.

A trial is ``done`` when it ran every stage (its last result carries ``trial_done``), ``stopped``
when the scheduler (ASHA) or the time budget ended it earlier, ``failed`` when it raised. Only done
trials compete for best: a stopped trial's metric was taken before the end of its training.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from vidray import storage
from vidray.config import dump_yaml
from vidray.tuning.config import ERROR_TAG, experiment_of, forced_settings, mlflow_client
from vidray.tuning.space import overrides_of, trial_configs


def trial_rows(cfg, results, children: dict[str, Any]) -> list[dict]:
    """One row per Tune trial, ordered by trial id; ``children`` maps trial id -> MLflow run."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or os.path.basename(str(result.path))  # Tune adds trial_id
        status = "failed" if result.error else ("done" if metrics.get("trial_done") else "stopped")
        child = children.get(trial_id)
        config = trial_params(result)
        rows.append({
            "trial": trial_id,
            "run": child.info.run_name if child else "",
            **{key: _shown(key, config.get(key)) for key in cfg.space},
            cfg.metric: _number(metrics.get(cfg.metric)),
            **({cfg.scheduler_metric: _number(metrics.get(cfg.scheduler_metric))}
               if cfg.scheduler_metric != cfg.metric else {}),
            "steps": int(metrics.get("step", 0) or 0),
            "status": status,
            "error": _first_line(result.error) if result.error else "",
            "_params": config,
            "_traceback": str(result.error or ""),
            "_run_id": child.info.run_id if child else None,
        })
    return sorted(rows, key=lambda r: r["trial"])


def trial_params(result) -> dict:
    """A trial's sampled values. A trial that failed before reporting anything, in a sweep that
    was resumed, comes back from Tune with ``config=None``; its ``params.json`` still holds them."""
    if result.config is not None:
        return result.config


    uri = storage.join(str(result.path), "params.json")
    return json.loads(storage.read_bytes(uri)) if result.path and storage.exists(uri) else {}


def _shown(key: str, value: Any) -> Any:
    if isinstance(value, dict):  # several paths set together: show them compactly
        return ", ".join(f"{p}={v}" for p, v in overrides_of(key, value))
    return value


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    # Ray wraps the trial's exception; its own message is the last non-empty line.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def best_row(cfg, rows: list[dict]) -> dict | None:
    scored = [r for r in rows if r["status"] == "done" and r[cfg.metric] is not None]
    if not scored:
        return None
    pick = min if cfg.mode == "min" else max
    return pick(scored, key=lambda r: r[cfg.metric])


def tied_with(cfg, rows: list[dict], best: dict | None) -> list[str]:
    """The other finished trials whose metric equals the best's: the pick among them is only the
    table's order (a short sweep on a small split often scores trials alike)."""
    if best is None:
        return []
    return [r["trial"] for r in rows
            if r is not best and r["status"] == "done" and r[cfg.metric] == best[cfg.metric]]


def format_table(cfg, rows: list[dict]) -> str:
    """A plain-text table of the public columns (those not starting with "_")."""
    columns = [c for c in rows[0] if not c.startswith("_")] if rows else []

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def metric_figure(cfg, rows: list[dict]):
    """The sweep's metric (and ASHA's, when it differs) against each swept parameter: done
    trials filled, trials stopped early hollow (ASHA's metric at the step they stopped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(cfg.space)
    metrics = list(dict.fromkeys([cfg.metric, cfg.scheduler_metric]))
    fig, axes = plt.subplots(len(metrics), len(keys), figsize=(4.2 * len(keys), 3.2 * len(metrics)),
                             squeeze=False)
    for i, metric in enumerate(metrics):
        for ax, key in zip(axes[i], keys):
            values = [r[key] for r in rows]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            labels = sorted({str(v) for v in values})
            for status, style in (("done", {"color": "C0"}), ("stopped", {"facecolors": "none"})):
                picked = [r for r in rows if r["status"] == status and r[metric] is not None]
                xs = [r[key] if numeric else labels.index(str(r[key])) for r in picked]
                ax.scatter(xs, [r[metric] for r in picked], edgecolors="C0", label=status, **style)
            if not numeric:
                ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
            ax.set(xlabel=key, ylabel=metric)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{cfg.name}: best = {cfg.mode} {cfg.metric}")
    fig.tight_layout()
    return fig


def finish_sweep(cfg, parent_run_id: str, results, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Settle every trial's MLflow run, log the report on the parent, print the table."""
    import mlflow

    client = mlflow_client(cfg)
    experiment_id = client.get_experiment_by_name(experiment_of(cfg)).experiment_id
    children = {run.data.tags.get("vidray.trial_id"): run for run in client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")}
    rows = trial_rows(cfg, results, children)
    for row in rows:
        _settle(client, row, children.get(row["trial"]), ERROR_TAG)
    best = best_row(cfg, rows)
    ties = tied_with(cfg, rows, best)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    table = format_table(cfg, rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "stopped", "failed")}
    with mlflow.start_run(run_id=parent_run_id):
        # The UI's table reads a dotted column name as a nested path and shows it blank.
        mlflow.log_table({k.replace(".", "/"): [r[k] for r in public] for k in public[0]}, "report/trials.json")
        mlflow.log_text(table + "\n", "report/trials.txt")
        mlflow.log_figure(metric_figure(cfg, rows), f"report/{cfg.metric}_vs_params.png")
        mlflow.log_metrics({f"trials_{s}": float(n) for s, n in counts.items()})
        if best:
            pretrain, finetune = trial_configs(cfg, best["_params"], forced_settings(cfg, best["trial"]))
            mlflow.log_metric(f"best_{cfg.metric}", best[cfg.metric])
            mlflow.set_tags({"best_trial": best["trial"], "best_run_id": str(best["_run_id"]),
                             "best_params": json.dumps(best["_params"], default=str)[:5000],
                             "best_tied_with": ",".join(ties)})
            mlflow.log_text(dump_yaml(pretrain), "best_config.yaml")
            if finetune is not None:
                mlflow.log_text(dump_yaml(finetune), "best_finetune_config.yaml")
    say(f"sweep {cfg.name}: {counts['done']} done, {counts['stopped']} stopped early, "
        f"{counts['failed']} failed\n{table}")
    if best:
        say(f"best trial {best['trial']}: {cfg.metric} {best[cfg.metric]:.4g} with "
            + ", ".join(f"{k}={best[k]}" for k in cfg.space) + f" (MLflow run {best['_run_id']})"
            + (f"; tied with {', '.join(ties)}: picked by the table's order" if ties else ""))
    else:
        say(f"no trial finished with {cfg.metric}: see the errors above")
    return {"name": cfg.name, "parent_run_id": parent_run_id, "trials": public, "counts": counts,
            "best": {k: v for k, v in best.items() if not k.startswith("_")} | {"run_id": best["_run_id"],
                                                                                "tied_with": ties}
            if best else None}


def _settle(client, row: dict, child, error_tag: str) -> None:
    """The child run's final status: FINISHED (done), KILLED (stopped early by the scheduler,
    tagged so: a green "Finished" read as a trial that ran to its end) or FAILED."""
    if child is None:
        return
    if row["status"] == "failed":
        if child.info.status != "FAILED":
            client.set_tag(child.info.run_id, error_tag, row["error"])
            client.log_text(child.info.run_id, row["_traceback"], "error.txt")
            client.set_terminated(child.info.run_id, "FAILED")
        return
    client.set_tag(child.info.run_id, "vidray.trial_status", row["status"])
    status = "FINISHED"
    if row["status"] == "stopped":
        client.set_tag(child.info.run_id, "vidray.stopped_early", "true")
        status = "KILLED"
    if child.info.status != status:
        client.set_terminated(child.info.run_id, status)
