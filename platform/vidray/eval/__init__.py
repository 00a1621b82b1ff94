"""Evaluation shared by every model: multiple-choice scoring and the MLflow report of an evaluation."""
