"""Ray Tune sweeps over config paths, with nested MLflow runs."""
