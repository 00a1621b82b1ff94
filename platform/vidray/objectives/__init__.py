"""Objectives as pure functions of tensors: masking (MLM 80/10/10, MMM, MFM, MVM), the one
contrastive loss, VLM's masked token loss and its fine-tuning heads."""
