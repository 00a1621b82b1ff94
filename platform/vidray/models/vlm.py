"""VLM: one BERT over ``[CLS] video [SEP] text`` (S3D features + WordPiece ids), for one device.

    model = build_vlm(ModelConfig(flavour="tiny"))
    hidden = model(batch["video"], batch["video_mask"], batch["text_ids"], batch["text_mask"])
    logits = model.lm_logits(hidden[:, model.slices(lv, lt)[1]])      # tied decoder, [B, Lt, V]
    video_vec, text_vec = pool(hidden, batch["video_mask"], batch["text_mask"])   # retrieval

Sequence (fixed slots, ``L = Lv + Lt + 2``): 0 = [CLS]; ``1..Lv`` = video; ``Lv+1`` = [SEP];
``Lv+2..`` = text slots, which hold the text, its final [SEP] and then [PAD] (``text_ids`` come
from the data pipeline that way, see :func:`vidray.data.vlm.collate`). Video slots are embedded
by ``video_mlp`` (512 -> H, GELU, LayerNorm, H -> H), [CLS]/[SEP] and text by BERT's word
embeddings; BERT's embedding module then adds position and token-type embeddings, LayerNorm and
dropout. Position ids follow REFERENCE.md: text continues after ``max_video_tokens + 1`` however
many video slots a batch carries; token type is 0 up to the first [SEP], 1 on text slots.

Which slot may attend to which is chosen per call (``attention="full" | "isolated" |
"causal_text"`` from :mod:`vidray.models.vlm_masks`, or an explicit bool mask); padded slots are never
attended to. The LM head is BERT's: prediction-head transform, then a decoder TIED to the word
embeddings plus a bias over the vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from vidray.config import ConfigError
from vidray.config.vlm import ModelConfig
from vidray.models.vlm_masks import ATTENTION_MASKS, restrict_to_valid, valid_slots
from vidray.models.weights import resolve_text_model

logger = logging.getLogger(__name__)

# bert-base-uncased WordPiece (also all-MiniLM-L6-v2's): the vocabulary of the text feature sets.
BERT_UNCASED_VOCAB = 30522
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0

# BertConfig sizes per flavour; ``text_backbone`` (when set) overrides them with its own config.
FLAVOURS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def bert_config(cfg: ModelConfig) -> BertConfig:
    """The BERT config of a model: the backbone checkpoint's if ``text_backbone`` is set, else the
    flavour's (bert-base-uncased vocabulary). Always SDPA attention (see ``VLM._attention_mask``)."""
    if cfg.text_backbone:
        path = resolve_text_model(cfg.text_backbone)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            # transformers would fall back to a default BertConfig for such a folder.
            raise ConfigError("model.text_backbone", f"{cfg.text_backbone!r} has no config.json; "
                                                     "point it at a BERT checkpoint folder")
        try:
            config = BertConfig.from_pretrained(path)
        except OSError as err:
            raise ConfigError("model.text_backbone", _unreadable(cfg.text_backbone, err)) from err
        if config.model_type != "bert":
            raise ConfigError("model.text_backbone",
                              f"{cfg.text_backbone!r} is a {config.model_type!r} checkpoint; VLM needs a BERT one")
    elif cfg.flavour in FLAVOURS:
        config = BertConfig(vocab_size=BERT_UNCASED_VOCAB, **FLAVOURS[cfg.flavour])
    else:
        raise ConfigError("model.flavour", f"unknown flavour {cfg.flavour!r}; choose one of {sorted(FLAVOURS)}")
    config._attn_implementation = "sdpa"
    if cfg.max_seq_len > config.max_position_embeddings:
        raise ConfigError("model.max_seq_len", f"{cfg.max_seq_len} exceeds the {config.max_position_embeddings} "
                                               "position embeddings of the BERT config")
    if cfg.max_video_tokens + 3 > cfg.max_seq_len:
        raise ConfigError("model.max_video_tokens", f"{cfg.max_video_tokens} video tokens + [CLS] + 2 [SEP] do not "
                                                    f"fit in model.max_seq_len={cfg.max_seq_len}")
    return config


def position_ids(lv: int, lt: int, max_video_tokens: int | None = None) -> torch.Tensor:
    """long ``[Lv + Lt + 2]``: [CLS] 0, video slot i -> i + 1, then the [SEP] and the text continue
    from ``max_video_tokens + 1`` (default ``lv``), so text keeps its positions in a batch whose
    video is padded to fewer slots. With ``lv == max_video_tokens`` this is the slot index."""
    offset = lv if max_video_tokens is None else max_video_tokens
    if lv > offset:
        raise ValueError(f"{lv} video slots exceed max_video_tokens={offset}")
    video = torch.arange(lv + 1)                  # [CLS] and the video slots
    rest = torch.arange(lt + 1) + offset + 1      # the first [SEP], then the text slots
    return torch.cat([video, rest])


def token_type_ids(lv: int, lt: int) -> torch.Tensor:
    """long ``[Lv + Lt + 2]``: 0 for [CLS], video and the first [SEP]; 1 for the text slots."""
    return torch.cat([torch.zeros(lv + 2, dtype=torch.long), torch.ones(lt, dtype=torch.long)])


def sequence_slices(lv: int, lt: int) -> tuple[slice, slice]:
    """Where the video slots and the text slots sit in the sequence."""
    return slice(1, 1 + lv), slice(lv + 2, lv + 2 + lt)


def pool(hidden: torch.Tensor, video_mask: torch.Tensor, text_mask: torch.Tensor,
         lv: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval vectors, two ``[B, H]`` tensors, as MMPT's ``MMFusion._pooling_vt_layer`` makes
    them: the mean over the valid video slots AND the [SEP] after them (the isolated mask gives
    that [SEP] to the video side; a clip with no valid slot pools to its [SEP] alone), and the
    mean over the valid text slots, which hold the text and its final [SEP] (an empty text pools
    to zeros)."""
    lv = video_mask.shape[1] if lv is None else lv
    if lv != video_mask.shape[1]:
        raise ValueError(f"lv={lv} but video_mask has {video_mask.shape[1]} slots")
    text_slots = sequence_slices(lv, text_mask.shape[1])[1]
    sep = torch.ones_like(video_mask[:, :1], dtype=torch.bool)
    video_side = torch.cat([video_mask.bool(), sep], dim=1)   # slots 1..Lv, then the [SEP] at Lv + 1
    return (_masked_mean(hidden[:, 1:lv + 2], video_side),
            _masked_mean(hidden[:, text_slots], text_mask))


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class VLM(nn.Module):
    """BERT over ``[CLS] video [SEP] text`` with a video MLP and BERT's tied MLM head."""

    def __init__(self, config: BertConfig, video_dim: int = 512, max_video_tokens: int = 32,
                 max_seq_len: int = 96, cls_id: int = CLS_ID, sep_id: int = SEP_ID):
        super().__init__()
        # The masks reach SDPA as bool [B, 1, L, L]; eager attention would ADD them as numbers.
        config._attn_implementation = "sdpa"
        self.config = config
        self.max_video_tokens, self.max_seq_len = max_video_tokens, max_seq_len
        self.cls_id, self.sep_id = cls_id, sep_id
        hidden = config.hidden_size
        self.bert = BertModel(config, add_pooling_layer=False)
        self.video_mlp = nn.Sequential(nn.Linear(video_dim, hidden), nn.GELU(),
                                       nn.LayerNorm(hidden, eps=config.layer_norm_eps), nn.Linear(hidden, hidden))
        self.head_transform = BertPredictionHeadTransform(config)
        # The decoder weight is the word-embedding matrix itself (F.linear in lm_logits); only the bias is new.
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        for module in [*self.video_mlp.modules(), *self.head_transform.modules()]:
            if isinstance(module, nn.Linear):  # BERT's initialisation for the new layers
                nn.init.normal_(module.weight, std=config.initializer_range)
                nn.init.zeros_(module.bias)

    def shard_units(self) -> list[nn.Module]:
        """Its own transformer layers: FSDP's shard units and compile's (vidray.train.parallel)."""
        return list(self.bert.encoder.layer)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def word_embeddings(self) -> torch.Tensor:
        """The ``[V, H]`` word-embedding matrix (also the LM decoder weight)."""
        return self.bert.embeddings.word_embeddings.weight

    @staticmethod
    def slices(lv: int, lt: int) -> tuple[slice, slice]:
        """Where the video slots and the text slots sit in the sequence."""
        return sequence_slices(lv, lt)

    pool = staticmethod(pool)

    def video_embeddings(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, Lv, H]``: the video MLP output, i.e. what a video slot holds before BERT's embedding
        sums (the masked token loss scores video candidates against these)."""
        return self.video_mlp(video)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., V]``: BERT's MLM head, transform then the decoder tied to the word embeddings."""
        return F.linear(self.head_transform(hidden), self.word_embeddings, self.lm_bias)

    def forward(self, video: torch.Tensor, video_mask: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor, attention: str | torch.Tensor = "full") -> torch.Tensor:
        """Final hidden states ``[B, L, H]`` of ``[CLS] video [SEP] text``.

        ``video`` float [B, Lv, video_dim], ``video_mask`` bool [B, Lv], ``text_ids`` long [B, Lt]
        (text, its final [SEP], then [PAD]), ``text_mask`` bool [B, Lt]. ``attention`` names a mask
        of ``ATTENTION_MASKS`` or is a bool [B, L, L] / [L, L] tensor, True = may attend.
        """
        lv, lt = video_mask.shape[1], text_ids.shape[1]
        self._check_lengths(lv, lt)
        device = text_ids.device
        output = self.bert(
            inputs_embeds=self._input_embeddings(video, text_ids),
            attention_mask=self._attention_mask(attention, video_mask, text_mask),
            position_ids=position_ids(lv, lt, self.max_video_tokens).to(device)[None],
            token_type_ids=token_type_ids(lv, lt).to(device)[None],
        )
        return output.last_hidden_state

    def _input_embeddings(self, video: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        words = self.bert.embeddings.word_embeddings
        special = words(torch.tensor([self.cls_id, self.sep_id], device=text_ids.device))
        cls, sep = (special[i].expand(text_ids.shape[0], 1, -1) for i in (0, 1))
        return torch.cat([cls, self.video_mlp(video), sep, words(text_ids)], dim=1)

    def _attention_mask(self, attention: str | torch.Tensor, video_mask: torch.Tensor,
                        text_mask: torch.Tensor) -> torch.Tensor:
        if isinstance(attention, str):
            if attention not in ATTENTION_MASKS:
                raise ValueError(f"attention={attention!r}: unknown mask; use one of {sorted(ATTENTION_MASKS)} "
                                 "or a bool [B, L, L] / [L, L] tensor")
            mask = ATTENTION_MASKS[attention](video_mask, text_mask)
        else:
            length = video_mask.shape[1] + text_mask.shape[1] + 2
            if attention.dim() not in (2, 3) or tuple(attention.shape[-2:]) != (length, length):
                raise ValueError(f"an explicit attention mask must be [B, {length}, {length}] or "
                                 f"[{length}, {length}], got {tuple(attention.shape)}")
            mask = restrict_to_valid(attention.to(video_mask.device), valid_slots(video_mask, text_mask))
        # transformers hands a 4-D mask to the attention function untouched, and SDPA reads a bool
        # mask as True = attend (as transformers' own SDPA masks do): no dtype to keep in step with
        # the queries under autocast, and no -inf arithmetic.
        return mask[:, None]

    def _check_lengths(self, lv: int, lt: int) -> None:
        if lv > self.max_video_tokens:
            raise ValueError(f"{lv} video slots exceed model.max_video_tokens={self.max_video_tokens}")
        if self.max_video_tokens + lt + 2 > self.max_seq_len:
            raise ValueError(f"{lt} text slots after {self.max_video_tokens} video tokens exceed "
                             f"model.max_seq_len={self.max_seq_len}; shorten the text or raise max_seq_len")


S3D_DIM = 512


def build_vlm(cfg: ModelConfig, load_backbone: bool = True) -> VLM:
    """A VLM of ``cfg.flavour`` (random init), or initialised from ``cfg.text_backbone``
    (``load_backbone=False``: its architecture only, for a checkpoint that holds every weight)."""
    # A job sets video_dim from its feature set (vidray.data.vlm.with_video_dim); a model built on its
    # own without one gets S3D's width.
    model = VLM(bert_config(cfg), video_dim=cfg.video_dim or S3D_DIM, max_video_tokens=cfg.max_video_tokens,
                max_seq_len=cfg.max_seq_len)
    if cfg.text_backbone and load_backbone:
        load_text_backbone(model, cfg.text_backbone)
    return model


def load_text_backbone(model: VLM, name_or_path: str) -> dict[str, bool]:
    """Copy a BERT checkpoint into ``model``: the encoder and embeddings always, the MLM head
    transform and bias when the checkpoint has them (else they keep their fresh init). Returns
    which of the head parts came from the checkpoint."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    try:
        # Its own load report (e.g. "cls.* MISSING" for a checkpoint without MLM head) is noise
        # here: the one line logged below says what was loaded.
        with _quiet(hf_logging):
            source, info = BertForMaskedLM.from_pretrained(resolve_text_model(name_or_path),
                                                           output_loading_info=True)
    except OSError as err:
        raise ConfigError("model.text_backbone", _unreadable(name_or_path, err)) from err
    model.bert.load_state_dict(source.bert.state_dict())
    missing = set(info["missing_keys"])
    loaded = {"head_transform": not any(k.startswith("cls.predictions.transform.") for k in missing),
              "lm_bias": "cls.predictions.bias" not in missing}
    if loaded["head_transform"]:
        model.head_transform.load_state_dict(source.cls.predictions.transform.state_dict())
    if loaded["lm_bias"]:
        with torch.no_grad():
            model.lm_bias.copy_(source.cls.predictions.bias)
    logger.info("text backbone %s loaded (MLM head transform: %s, LM bias: %s)", name_or_path,
                *("checkpoint" if loaded[k] else "fresh init" for k in ("head_transform", "lm_bias")))
    return loaded


@contextlib.contextmanager
def _quiet(hf_logging):
    """transformers' warnings and progress bars off for a block, then back as they were."""
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _unreadable(name_or_path: str, err: Exception) -> str:
    return (f"cannot load a BERT checkpoint from {name_or_path!r} ({err}); give a local folder with "
            "config.json and weights, or a hub name reachable from here (HF_HUB_OFFLINE unset)")
