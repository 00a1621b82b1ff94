"""Typed configs of the frames models (they train on the ``frames`` feature set, not on S3D).

The same commands as VLM run them: ``vidray pretrain|finetune CONFIG`` picks the frames path when
the config says ``model.arch: allinone``; ``vidray evaluate`` follows the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from vidray.archs import RECIPE_TASKS, frames_arch
from vidray.config import ConfigError, option
from vidray.config.train import OptimConfig, TrainConfig
from vidray.tracking import MLflowConfig

MVM_TOKENIZERS = ("semantic", "pixel", "none")
# The tasks a fine-tuning run trains; a row of a multi-task dataset carries its task's index here.
FINETUNE_TASKS = ("retrieval", "qa", "mc")


@dataclass
class FramesModelConfig:
    arch: str = option(
        "allinone", "a model of vidray.archs.FRAMES_ARCHS. allinone: one transformer over text + per-frame ViT "
        "patches, temporal token rolling; lavender: video encoder + BERT fusion, every task as MLM through "
        "the one MLM head; evilm: small conv encoder + tiny BERT + narrow decoder, masked video modelling "
        "on VQ codes; example: the smallest model, how to add one (docs/layout.md)")
    flavour: Literal["tiny", "base"] = option("tiny", "model size; tiny is for CPU tests and the demo")
    image_size: int = option(224, "frames are resized to image_size x image_size (a multiple of the "
                             "16-px patches; evilm: of its stride, 16 tiny / 32 base)", ge=16)
    num_frames: int = option(3, "frames per clip, evenly picked from the feature set's frames", ge=1)
    max_text_tokens: int = option(40, "WordPiece tokens of a caption or question, [CLS] and [SEP] included",
                                  ge=4)
    tokenizer: str = option("minilm", "tokenizer folder, hub name, or 'minilm' (offline package); "
                            "its vocabulary sizes the word embeddings")
    embed_dim: int = option(256, "width of the retrieval embeddings", ge=1)
    temporal_roll: bool = option(True, "allinone: swap a few visual tokens between neighbouring frames "
                                 "before every block of a joint pass; false is the paper's ablation, where "
                                 "frames meet only in the final mean")

    def validate(self) -> None:
        spec = frames_arch(self.arch)
        if not self.temporal_roll and not spec.token_rolling:
            raise ConfigError("temporal_roll", f"false is All-in-one's ablation; {self.arch} has no token "
                              "rolling: drop it or set model.arch=allinone")


@dataclass
class FramesDataConfig:
    source: Literal["frames", "videos"] = option(
        "frames", "where clips come from. frames: the data.frames feature set (decoded once by `vidray "
        "extract`, cheap per run); videos: data.manifest's videos decoded at the start of every run with "
        "the frames extractor's sampler (model.num_frames uniform frames per caption clip at "
        "model.image_size), no extraction step or stored set; unreadable videos are skipped and named")
    frames: str = option("", "frames feature-set version URI (<root>/frames/<version>); data.source=frames")
    manifest: str = option("", "manifest of the corpus: selects the split (empty = every video); "
                           "with data.source=videos also the videos to decode (required)")
    split: str = option("train", "manifest split to train on")
    val_split: str = option("val", "manifest split scored every train.val_every steps (needs data.manifest)")
    qa: str = option("", "open-ended QA jsonl ({video, question, answer, start, end}; the synthetic "
                     "corpus's qa.jsonl): the qa task's questions, matched to clips by video and start")
    mc: str = option("", "multiple-choice QA jsonl ({video, question, options, answer, start, end}; the "
                     "synthetic corpus's mc.jsonl): lavender's mc task, matched to clips as data.qa")
    vq: dict[str, str] = option(default_factory=dict, help=(
        "evilm MVM: tokenizer choice -> vq feature-set version URI (`vidray extract` with extractor "
        "vq), e.g. {semantic: URI, pixel: URI}; objective.mvm_tokenizer picks one"))


@dataclass
class FramesObjectiveConfig:
    mlm_prob: float = option(0.15, "text token masking rate (80/10/10)", gt=0.0, lt=1.0)
    vtm_weight: float = option(1.0, "weight of the video-text matching loss next to MLM", ge=0.0)
    vtm_negatives: int = option(3, "lavender: texts of other rows each clip is matched with (target 'false'), "
                                "drawn at random from the batch, next to its own (target 'true'); the official "
                                "min(batch, 4) - 1", ge=1)
    mvm_tokenizer: Literal["semantic", "pixel", "none"] = option(
        "none", "evilm masked video modelling targets: the codes of the data.vq set of that name "
                "(semantic: a VQ tokenizer trained to predict caption words; pixel: one trained to "
                "reconstruct pixels); none: no MVM (MLM + VTM only). A sweepable choice")
    mvm_mask_ratio: float = option(0.4, "evilm: share of each frame's regions masked block-wise for MVM",
                                   gt=0.0, lt=1.0)
    mvm_weight: float = option(1.0, "evilm: weight of the MVM loss next to MLM + VTM", ge=0.0)


@dataclass
class FramesPretrainConfig:
    """`vidray pretrain` of a frames model: MLM + video-text matching on the frames feature set."""

    model: FramesModelConfig = field(default_factory=FramesModelConfig)
    objective: FramesObjectiveConfig = field(default_factory=FramesObjectiveConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=100))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64))
    data: FramesDataConfig = field(default_factory=FramesDataConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)


@dataclass
class FramesFinetuneConfig:
    """`vidray finetune` of a frames model for retrieval, open-ended QA, and (LAVENDER) multiple-choice
    QA or several of them at once."""

    task: Literal["retrieval", "qa", "mc", "multi"] = option(
        "retrieval", "retrieval: text-only and video-only passes, contrastive loss (fast retrieval; "
        "lavender: true/false at a [MASK]); qa: joint pass over question + frames, a classifier over "
        "the answer vocabulary (lavender: one word at a [MASK]); mc (lavender): each question + option "
        "read true/false at a [MASK] (data.mc); multi (lavender): every task of `tasks` at once, one head")
    tasks: list[Literal["retrieval", "qa", "mc"]] = option(
        default_factory=list, help="task=multi: the tasks trained together by the one MLM head, e.g. "
        "[retrieval, qa, mc]; their examples are mixed in every batch and their losses summed")
    init_from: Optional[str] = option(
        None, "pre-training checkpoint folder (…/checkpoint_NNNNNNNN) whose weights start the "
              "fine-tuning; null = random init")
    answers: list[str] = option(default_factory=list, help="qa: the answer vocabulary; empty = every "
                                "answer of the training split's questions (filled in before training)")
    match_negatives: Optional[int] = option(
        None, "lavender retrieval: null = every clip of the batch against every text, B x B pairs (the "
              "official rule); N = each clip with its own text and N random others, as pre-training (fewer "
              "pairs per step)", ge=1)
    model: FramesModelConfig = field(default_factory=FramesModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=100))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32))
    data: FramesDataConfig = field(default_factory=FramesDataConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def trained_tasks(self) -> list[str]:
        """The tasks this run trains: ``tasks`` for multi, else ``[task]``."""
        return list(self.tasks) if self.task == "multi" else [self.task]

    def validate(self) -> None:
        if self.task == "multi":
            if not self.tasks:
                raise ConfigError("tasks", "is required with task=multi: the tasks to train together, "
                                  "e.g. tasks=[retrieval,qa,mc]")
            twice = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            if twice:
                raise ConfigError("tasks", f"names {', '.join(twice)} more than once; list each task once")
        elif self.tasks:
            raise ConfigError("tasks", f"is for task=multi; task={self.task} trains one task: drop tasks "
                              "or set task=multi")
        if self.task not in RECIPE_TASKS[frames_arch(self.model.arch).recipe]:
            what = "mc fine-tuning" if self.task == "mc" else "multi-task fine-tuning with one head"
            name = {"allinone": "All-in-one", "evilm": "E-ViLM"}.get(self.model.arch, self.model.arch)
            raise ConfigError("task", f"{what} is LAVENDER's; {name} scores MC through retrieval "
                              "(`vidray evaluate mc=FILE` on a task=retrieval checkpoint): set task=retrieval "
                              "or model.arch=lavender")


# --- the VQ video tokenizer of E-ViLM (`vidray train-vq`) ----------------------------------------

@dataclass
class VQModelConfig:
    kind: Literal["semantic", "pixel"] = option(
        "semantic", "semantic: the decoder predicts the caption's words (multi-label, focal loss), "
                    "E-ViLM's tokenizer; pixel: it reconstructs the frames' pixels (a DALL-E-like control)")
    flavour: Literal["tiny", "base"] = option("tiny", "tiny for CPU tests and the demo; base: ViT-B "
                                              "encoder, 8-layer decoder")
    image_size: int = option(256, "frames resized to image_size x image_size (a multiple of the patch)", ge=16)
    num_frames: int = option(4, "frames per clip, as the E-ViLM model that reads the codes", ge=1)
    patch: int = option(32, "pixels per region side: one code per patch of every frame; must equal "
                            "E-ViLM's stride (16 tiny, 32 base) for MVM", ge=4)
    codebook_size: int = option(9420, "codes in the codebook", ge=2)
    code_dim: int = option(32, "width of the l2-normalised codes", ge=2)
    max_text_tokens: int = option(40, "caption tokens read for the semantic targets", ge=4)
    tokenizer: str = option("minilm", "text tokenizer whose vocabulary the semantic decoder predicts")


@dataclass
class VQObjectiveConfig:
    focal_gamma: float = option(1.0, "focal exponent on the negative words (1: the paper's p*log(1-p))", ge=0.0)
    commitment: float = option(1.0, "weight of ||E(x) - sg[code]||² (the encoder's commitment); the "
                                    "codebook term ||sg[E(x)] - code||² has weight 1", ge=0.0)
    dead_code_patience: int = option(10, "steps a code may go unpicked before it is moved onto a random "
                                         "encoder output (against codebook collapse); 0 = never", ge=0)


@dataclass
class VQTokenizerConfig:
    """`vidray train-vq`: E-ViLM's VQ video tokenizer on the frames feature set."""

    model: VQModelConfig = field(default_factory=VQModelConfig)
    objective: VQObjectiveConfig = field(default_factory=VQObjectiveConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=100))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64))
    data: FramesDataConfig = field(default_factory=FramesDataConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
