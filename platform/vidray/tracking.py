"""MLflow settings shared by every job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from vidray.config import option


@dataclass
class MLflowConfig:
    """Where runs are tracked. Train workers chdir into Ray's session dir, so a relative sqlite
    URI would land somewhere unexpected: use a server URL or an absolute path."""

    tracking_uri: Optional[str] = option(None, "MLflow tracking URI; null = $MLFLOW_TRACKING_URI")
    experiment: Optional[str] = option(None, "experiment name; null = one experiment per job kind")

    def resolved_uri(self) -> str | None:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
