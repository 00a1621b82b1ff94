"""MLflow settings shared by every job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from vidray.config import ConfigError, option, redact

# MLflow writes "View run ... at URL" to stdout when a run ends on a tracking server; from Ray
# workers that lands in the driver's stdout, where `vidray` prints its JSON report. Our jobs say
# their run ids on stderr instead. (Every job imports this module, in the driver and the workers.)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@dataclass
class MLflowConfig:
    """Where runs are tracked. Train workers chdir into Ray's session dir, so a relative sqlite
    URI would land somewhere unexpected: use a server URL or an absolute path."""

    tracking_uri: Optional[str] = option(None, "MLflow tracking URI; null = $MLFLOW_TRACKING_URI")
    experiment: Optional[str] = option(None, "experiment name; null = one experiment per job kind")

    def resolved_uri(self) -> str | None:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


# MLflow 3's UI opens an experiment with no kind in its GenAI view (an empty Traces overview,
# "Evaluations"); vidray's runs are model training.
EXPERIMENT_KIND = "custom_model_development"


def use_experiment(name: str) -> str:
    """``mlflow.set_experiment(name)``, the experiment marked as model training; its id."""
    import mlflow

    experiment = mlflow.set_experiment(name)
    if "mlflow.experimentKind" not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    return experiment.experiment_id


def find_run(tracking_uri: str | None, experiment: str, run_name: str):
    """The MLflow run tagged ``vidray.run_name = run_name`` in ``experiment``, or None: how a job
    run again (a rerun, a restart, a sweep's retried trial) finds the run it logs into."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow.search_runs([found.experiment_id], output_format="list", max_results=1,
                              filter_string=f"tags.`vidray.run_name` = '{run_name}'")
    return runs[0] if runs else None


def alive_nodes() -> int:
    """Nodes of the Ray cluster this process is connected to (1 without Ray)."""
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"]) if ray.is_initialized() else 1


def decide_tracking_uri(uri: str | None, experiment: str, nodes: int = 1) -> str:
    """The one tracking URI of a job whose runs are logged from Ray workers, decided in its driver
    before any work and handed to every worker.

    ``uri`` (``mlflow.tracking_uri``), else ``$MLFLOW_TRACKING_URI``, else MLflow's default (a
    sqlite file in this directory), made absolute: workers run in Ray's session directory, where
    a relative path names another store, and the driver would not find the run they logged.
    A file store on a cluster of ``nodes`` > 1 is refused: rank 0 may run on another machine and
    log to a store of its own there. The store is opened here once, so a URI that cannot work
    (MLflow 3 refuses ``./mlruns`` folders) fails now, not after training, in every retry.
    """
    import mlflow
    from mlflow.exceptions import MlflowException


    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    elif "://" not in uri:
        uri = os.path.abspath(uri)
    if uri.startswith(("sqlite:", "file:", "/")) and nodes > 1:
        raise ConfigError("mlflow.tracking_uri", f"{uri} is a file on this machine, but the Ray cluster has "
                          f"{nodes} nodes: each would log to a store of its own. Set MLFLOW_TRACKING_URI (or "
                          "mlflow.tracking_uri=...) to an MLflow server every node reaches (infra/mlflow)")
    mlflow.set_tracking_uri(uri)
    try:
        use_experiment(experiment)
    except MlflowException as err:
        raise ConfigError("mlflow.tracking_uri", f"MLflow cannot use {redact(uri)}: {err.message} "
                          "(give a server URL or sqlite:////absolute/path/mlflow.db)") from None
    return uri
