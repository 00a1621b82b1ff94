"""Training: the loop and its ``System`` contract, parallelism, the Ray Train job, and each
model's systems and runners (VLM, the frames models, the VQ tokenizer)."""
