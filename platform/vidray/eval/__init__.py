"""Evaluation shared by every model: retrieval and multiple-choice scoring, and the MLflow report of an evaluation."""
