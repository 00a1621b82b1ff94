"""Typed configs of the pre-training / fine-tuning jobs (defaults = the VLM paper's, REFERENCE.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from vidray.config import ConfigError, option
from vidray.config.vlm import DataConfig, ModelConfig, ObjectiveConfig
from vidray.tracking import MLflowConfig


@dataclass
class OptimConfig:
    lr: float = option(5e-5, "peak learning rate", gt=0.0)
    betas: list[float] = option(default_factory=lambda: [0.9, 0.98], help="Adam betas")
    weight_decay: float = option(0.0, "decoupled weight decay", ge=0.0)
    warmup_steps: int = option(100, "linear warm-up steps before polynomial decay (a tenth of the default train.steps)", ge=0)
    grad_clip: float = option(2.0, "max global gradient norm", gt=0.0)

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps", ge=1)
    batch_size: int = option(256, "global batch size (split across workers)", ge=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", ge=1)
    num_workers: int = option(2, "Ray Train workers", ge=1)
    use_gpu: bool = option(False, "one GPU per worker")
    strategy: Literal["ddp", "fsdp"] = option(
        "ddp", "ddp: a full replica per worker; fsdp: parameters, gradients and optimizer state "
        "sharded across workers (FSDP2, one unit per transformer layer)")
    precision: Literal["fp32", "bf16"] = option("bf16", "autocast dtype on GPU (CPU runs fp32)")
    compile: bool = option(False, "torch.compile each transformer layer (one graph per layer; the "
                           "first steps pay the compile). For GPUs: on CPU it measured 0.82x eager")
    shuffle_buffer: int = option(
        256, "rows each worker draws its batches from at random (Ray Data's local shuffle), in a new "
        "order every epoch; 0 reads rows in dataset order, where a video's clips sit side by side and "
        "become each other's in-batch negatives. Costs that many decoded rows of memory per worker", ge=0)
    checkpoint_every: int = option(200, "steps between checkpoints", ge=1)
    log_every: int = option(10, "steps between progress lines (MLflow gets every step)", ge=1)
    val_every: int = option(0, "steps between held-out validation passes (val_* metrics, fixed "
                            "masking so runs compare); 0 = none", ge=0)
    storage_path: str = option("runs", "checkpoint root (local path or s3://)")
    run_name: Optional[str] = option(None, "stable name so a rerun resumes; null = derived", name=True)
    max_failures: int = option(2, "worker-group restarts before giving up (a lost node or worker)", ge=0)
    placement: Literal["PACK", "SPREAD"] = option(
        "PACK", "where Ray puts the workers: PACK fills a node before the next (all-reduce within a "
        "node); SPREAD puts them on different nodes where it can (a lost node takes fewer of them)")
    seed: int = option(0, "global seed")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)


# --- fine-tuning and evaluation --------------------------------------------------------------

TASKS = ("retrieval", "captioning", "action_segmentation")


@dataclass
class FinetuneDataConfig:
    features: str = option("", "video feature-set version URI (<root>/s3d/<version>, or image2d)", required=True)
    text: str = option("", "text feature-set version URI (<root>/text/<version>); its tokenizer "
                       "also tokenizes MC options and decodes generated captions", required=True)
    manifest: str = option("", "manifest of the corpus: selects the split (empty = every video)")
    split: str = option("train", "manifest split to fine-tune on")
    labels: str = option("", "action_segmentation: COIN-format annotations (database/annotation/"
                         "segment/label), e.g. the synthetic corpus's coin.json")
    segment_stride: int = option(16, "action_segmentation: stride of the sliding windows, seconds", ge=1)


@dataclass
class FinetuneConfig:
    """`vidray finetune`: one task on top of a pre-trained (or freshly initialised) VLM."""

    task: Literal["retrieval", "captioning", "action_segmentation"] = option(
        "retrieval", "retrieval: isolated masks + contrastive loss; captioning: causal text mask + "
        "LM head; action_segmentation: per-second classifier over the video tokens")
    init_from: Optional[str] = option(
        None, "pre-training checkpoint folder (…/checkpoint_NNNNNNNN, local or s3://) whose VLM "
              "weights start the fine-tuning; null = model.text_backbone / random init")
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=122))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64))
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)


@dataclass
class EvaluateConfig:
    """`vidray evaluate`: a fine-tuned checkpoint on a split; data URIs default to the checkpoint's."""

    checkpoint: str = option("", "fine-tuning checkpoint folder (…/checkpoint_NNNNNNNN, local or s3://)",
                             required=True)
    split: str = option("test", "manifest split to evaluate on")
    features: str = option("", "S3D feature-set version; empty = the one the checkpoint was trained on")
    text: str = option("", "text feature-set version; empty = the checkpoint's")
    manifest: str = option("", "manifest; empty = the checkpoint's")
    labels: str = option("", "action_segmentation labels (COIN format); empty = the checkpoint's")
    frames: str = option("", "frames models: frames feature-set version; empty = the checkpoint's")
    qa: str = option("", "frames models, qa task: questions jsonl; empty = the checkpoint's")
    mc: str = option("", "multiple-choice QA jsonl ({video, question, options, answer, start, end}): "
                     "a retrieval checkpoint (VLM or frames model) scores each option with its retrieval "
                     "model (empty = skip); a LAVENDER mc / multi checkpoint's questions (empty = its data.mc)")
    batch_size: int = option(64, "clips per forward pass", ge=1)
    beam_size: int = option(5, "captioning: beam width (1 = greedy only)", ge=1)
    max_caption_tokens: int = option(24, "captioning: longest generated caption", ge=1)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
