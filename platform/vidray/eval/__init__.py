"""Evaluation: retrieval, multiple-choice, captioning and segmentation scoring shared by every
model, each model family's evaluator, and the MLflow report of an evaluation."""
