"""MLflow settings shared by every job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from vidray.config import option

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
