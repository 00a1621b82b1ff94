"""Pre-training and fine-tuning (Ray Train). Only the typed configs exist so far; the loop,
models and objectives arrive with the VLM training issue."""
