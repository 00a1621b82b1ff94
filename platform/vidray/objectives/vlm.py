"""VLM pre-training objectives: per-example masking and the two losses (REFERENCE.md, "VLM").

Masking (:func:`mask_batch`): each example is, with probability ``mmm_ratio``, a masked
modality model (MMM) example whose whole text or whole video (coin flip) is masked; otherwise it
is an MFM-MLM example (15% of text tokens 80/10/10, 15% of video slots zeroed). As in MMPT, the
tokens of a whole masked text are corrupted 80/10/10 too (``objective.mmm_text_corruption``), and
random replacements come from the whole vocabulary (:mod:`vidray.objectives.masking`, shared with the frames
models).

Losses, pure functions on tensors (one device; no model code):

- :func:`masked_token_loss` (the paper's L_VLM): ONE softmax per masked token over a mixed pool
  of candidates = every non-masked valid video token of the batch (through the video MLP) plus the
  whole word-embedding matrix (tied decoder). A masked video token's positive is its own original
  video token; a masked text token's positive is its word id. No temperature.
- :func:`mfm_mlm_loss` (the baseline L_MFM-MLM): NCE over in-batch non-masked video tokens for
  video + ordinary MLM cross-entropy for text, summed.

The sequence layout the gather helpers assume is the model's: index 0 = [CLS], 1..Lv = video
slots, Lv+1 = [SEP], Lv+2.. = text slots (the text ends with its own [SEP], then [PAD]).

    masked = mask_batch(batch, cfg.objective, SpecialIds(), generator)
    hidden = transform(model(masked))                       # [B, 1 + Lv + 1 + Lt, H]
    video_h, text_h, text_ids = gather_predictions(hidden, masked, Lv)
    pos, cand = video_candidates(video_mlp(masked.video_original), masked)
    loss, logs = masked_token_loss(video_h, pos, cand, text_h, text_ids, word_emb, lm_bias)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from vidray.config.vlm import ObjectiveConfig
from vidray.objectives.masking import IGNORE_INDEX, corrupt, random_token_ids, uniform

MMM_NONE, MMM_TEXT, MMM_VIDEO = 0, 1, 2
"""Values of :attr:`MaskedBatch.mmm`: MFM-MLM example, whole text masked, whole video masked."""


@dataclass(frozen=True)
class SpecialIds:
    """Special token ids of the text vocabulary (defaults: bert-base-uncased)."""

    pad: int = 0
    """[PAD]: after the final [SEP]; never selected."""
    cls: int = 101
    """[CLS]: never selected (the data pipeline does not put it in ``text_ids``, checked anyway)."""
    sep: int = 102
    """[SEP]: the final text token; never selected."""
    mask: int = 103
    """[MASK]: what a picked text token becomes 80% of the time (MLM and whole-text MMM alike)."""
    vocab_size: int = 30522
    """Size of the word-embedding matrix; random replacements are drawn from all of [0, vocab_size),
    special ids included (:mod:`vidray.objectives.masking`, as MMPT and HuggingFace's MLM collator do)."""


@dataclass
class MaskedBatch:
    """A batch after masking. Shapes: B examples, Lv video slots, Lt text slots, D feature width."""

    video: torch.Tensor
    """float [B, Lv, D]: a copy of the features with the masked slots set to zeros."""
    text_ids: torch.Tensor
    """long [B, Lt]: a copy of the ids with the selected tokens corrupted ([MASK] / random / kept)."""
    video_targets: torch.Tensor
    """bool [B, Lv]: video slots to predict (masked and valid)."""
    text_targets: torch.Tensor
    """long [B, Lt]: the original id where a text token is predicted, ``IGNORE_INDEX`` elsewhere."""
    video_original: torch.Tensor
    """float [B, Lv, D]: the unmasked features (the input tensor itself, not a copy)."""
    mmm: torch.Tensor
    """long [B]: ``MMM_NONE`` (MFM-MLM), ``MMM_TEXT`` (whole text masked), ``MMM_VIDEO``."""
    video_mask: torch.Tensor
    """bool [B, Lv]: valid video slots (passed through from the batch)."""
    text_mask: torch.Tensor
    """bool [B, Lt]: real text tokens and the final [SEP] (passed through from the batch)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MaskedBatch":
        """The same batch with every tensor on ``device`` (masking runs on CPU, the model may not)."""
        return MaskedBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                              for f in fields(self)})


_BATCH_KEYS = ("video", "video_mask", "text_ids", "text_mask")


@dataclass
class MaskingDraws:
    """Every random number :func:`apply_masking` reads, drawn for every slot whatever the data."""

    u_example: torch.Tensor
    """float [B]: MMM example when below ``mmm_ratio``."""
    u_side: torch.Tensor
    """float [B]: an MMM example masks its whole text when below 0.5, else its whole video."""
    u_text: torch.Tensor
    """float [B, Lt]: an MFM-MLM example picks a text token when below ``mlm_prob``."""
    u_kind: torch.Tensor
    """float [B, Lt]: a picked token's fate, :func:`vidray.objectives.masking.corrupt`'s roll (80/10/10)."""
    u_video: torch.Tensor
    """float [B, Lv]: an MFM-MLM example zeroes a video slot when below ``mfm_prob``."""
    random_ids: torch.Tensor
    """long [B, Lt]: replacement ids, uniform over the whole vocabulary (:mod:`vidray.objectives.masking`)."""


def draw_masking(B: int, Lv: int, Lt: int, vocab_size: int, generator: Optional[torch.Generator],
                 text_device: torch.device, video_device: torch.device) -> MaskingDraws:
    """The draws of one batch, in a fixed order (the same generator state gives the same masks)."""
    # Keyword arguments are evaluated left to right: this order is the generator's order.
    return MaskingDraws(u_example=uniform((B,), generator, text_device),
                        u_side=uniform((B,), generator, text_device),
                        u_text=uniform((B, Lt), generator, text_device),
                        u_kind=uniform((B, Lt), generator, text_device),
                        u_video=uniform((B, Lv), generator, video_device),
                        random_ids=random_token_ids((B, Lt), vocab_size, generator, text_device))


def mask_batch(batch: Mapping[str, torch.Tensor], cfg: ObjectiveConfig, special: SpecialIds,
               generator: Optional[torch.Generator] = None) -> MaskedBatch:
    """Mask a batch per example: MMM with probability ``cfg.mmm_ratio``, else MFM-MLM.

    ``batch`` holds ``video`` [B, Lv, D], ``video_mask`` [B, Lv], ``text_ids`` [B, Lt] and
    ``text_mask`` [B, Lt]; it is not modified. The same ``generator`` state gives the same output
    (every random number is drawn for every slot, so the draws do not depend on the data). The
    rule itself is :func:`apply_masking`'s.
    """
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"mask_batch: the batch lacks {missing}; it needs {list(_BATCH_KEYS)}")
    (B, Lv), Lt = batch["video_mask"].shape, batch["text_ids"].shape[1]
    draws = draw_masking(B, Lv, Lt, special.vocab_size, generator, batch["text_ids"].device,
                         batch["video"].device)
    return apply_masking(batch, cfg, special, draws)


def apply_masking(batch: Mapping[str, torch.Tensor], cfg: ObjectiveConfig, special: SpecialIds,
                  draws: MaskingDraws) -> MaskedBatch:
    """The masking rule (MMPT's ``MFMMLMAligner``), given the random numbers.

    - MMM (half text, half video): every real text token is picked, or every valid video slot is
      zeroed; all of them are predicted, the other modality is left intact. Picked text tokens
      are corrupted 80/10/10 like MLM picks (MMPT's ``TextMaskingProcessor`` with
      ``modality_masking="full"``); ``cfg.mmm_text_corruption="mask"`` makes them all [MASK].
    - MFM-MLM: each real text token (never [CLS]/[SEP]/[PAD]) is picked with ``cfg.mlm_prob``:
      80% -> [MASK], 10% -> a random id (uniform over the whole vocabulary), 10% kept; each valid
      video slot is picked with ``cfg.mfm_prob`` and zeroed.
    """
    video, video_mask = batch["video"], batch["video_mask"].bool()
    text_ids, text_mask = batch["text_ids"], batch["text_mask"].bool()
    device = text_ids.device

    is_mmm = draws.u_example < cfg.mmm_ratio
    mmm = torch.where(is_mmm, torch.where(draws.u_side < 0.5, MMM_TEXT, MMM_VIDEO), MMM_NONE).long()
    mlm, whole_text = (mmm == MMM_NONE)[:, None], (mmm == MMM_TEXT)[:, None]

    specials = torch.tensor([special.cls, special.sep, special.pad], device=device)
    real_text = text_mask & ~torch.isin(text_ids, specials)
    text_pick = real_text & (whole_text | (mlm & (draws.u_text < cfg.mlm_prob)))
    roll = draws.u_kind
    if cfg.mmm_text_corruption == "mask":
        roll = roll.masked_fill(whole_text, 0.0)  # a roll of 0 always means [MASK]
    corrupted = corrupt(text_ids, text_pick, roll, draws.random_ids, special.mask)
    text_targets = torch.where(text_pick, text_ids, IGNORE_INDEX)

    mmm_v, mlm_v = mmm.to(video.device), mlm.to(video.device)
    video_pick = video_mask & ((mmm_v == MMM_VIDEO)[:, None] | (mlm_v & (draws.u_video < cfg.mfm_prob)))
    masked_video = video.masked_fill(video_pick[..., None], 0.0)

    return MaskedBatch(video=masked_video, text_ids=corrupted, video_targets=video_pick,
                       text_targets=text_targets, video_original=video, mmm=mmm,
                       video_mask=video_mask, text_mask=text_mask)


def gather_predictions(hidden: torch.Tensor, masked: MaskedBatch, Lv: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states at the predicted positions, in row-major (example, slot) order.

    ``hidden`` [B, S, H] uses the layout [CLS] v_1..v_Lv [SEP] t_1..t_Lt (S >= Lv + 2 + Lt).
    Returns ``video_hidden`` [Nv, H], ``text_hidden`` [Nt, H] and ``text_target_ids`` [Nt].
    Apply the prediction transform before or after this (after is cheaper: fewer rows).
    """
    B, Lt = masked.text_targets.shape
    if masked.video_targets.shape != (B, Lv):
        raise ValueError(f"gather_predictions: video_targets is {tuple(masked.video_targets.shape)}, "
                         f"expected ({B}, {Lv}) for Lv={Lv}")
    if hidden.shape[0] != B or hidden.shape[1] < Lv + 2 + Lt:
        raise ValueError(f"gather_predictions: hidden is {tuple(hidden.shape)}, expected "
                         f"[{B}, >= {Lv + 2 + Lt}, H] = [CLS] + {Lv} video + [SEP] + {Lt} text")
    text_pick = masked.text_targets != IGNORE_INDEX
    video_hidden = hidden[:, 1:1 + Lv][masked.video_targets]
    text_hidden = hidden[:, Lv + 2:Lv + 2 + Lt][text_pick]
    return video_hidden, text_hidden, masked.text_targets[text_pick]


def video_candidates(video_emb: torch.Tensor, masked: MaskedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and in-batch negatives for the video predictions.

    ``video_emb`` [B, Lv, H] is the video MLP applied to ``masked.video_original``. Returns
    ``pos`` [Nv, H] (the original token of each masked slot, same order as
    :func:`gather_predictions`) and ``cand`` [Nc, H] (every valid, non-masked slot of the batch).
    """
    pos = video_emb[masked.video_targets]
    cand = video_emb[masked.video_mask & ~masked.video_targets]
    return pos, cand


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # 0 when there is nothing to predict (n_video / n_text tell a logger how to weight it).
    hits = (logits.detach().argmax(-1) == target).float().sum()
    return hits / max(target.numel(), 1)


def _video_chance(candidates: int) -> float:
    """``acc_video`` of a guess among the batch's video tokens: its own and the ``candidates``
    (the masked token loss also offers every word, which a guess among video tokens skips)."""
    return 1.0 / (1 + candidates)


def _logs(device: torch.device, **values: torch.Tensor | float) -> dict[str, float]:
    # One device->host copy for all the numbers instead of one .item() each.
    numbers = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
                           for v in values.values()])
    return dict(zip(values, numbers.tolist()))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Softmax over ~30k candidates in fp16/bf16 loses the target's probability; fp64 stays fp64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_token_loss(pred_video: torch.Tensor, pos_video: torch.Tensor, cand_video: torch.Tensor,
                      pred_text: torch.Tensor, text_targets: torch.Tensor, word_emb: torch.Tensor,
                      lm_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The VLM masked token loss: one softmax over video and text candidates, no temperature.

    ``pred_video`` [Nv, H] / ``pred_text`` [Nt, H]: transformed hidden states at the masked video
    / predicted text positions; ``pos_video`` [Nv, H]: each video prediction's own original token
    through the video MLP; ``cand_video`` [Nc, H]: every non-masked valid video token of the batch
    (negatives for all); ``text_targets`` [Nt]: word ids; ``word_emb`` [V, H] (tied decoder) and
    ``lm_bias`` [V] (the text candidates' bias; video candidates have none).

    Logits of a video prediction: [h.pos, h.cand (Nc), h.word_emb + bias (V)], target 0.
    Logits of a text prediction: [h.cand (Nc), h.word_emb + bias (V)], target Nc + word id.
    Returns the mean cross-entropy over all Nv + Nt predictions (0 with a grad_fn if none), logs.
    """
    Nv, Nt, Nc = pred_video.shape[0], pred_text.shape[0], cand_video.shape[0]
    # Every prediction shares the pool [cand_video; word_emb]; a video prediction gets one extra
    # column in front (its own positive). Text rows put -inf there, so that column is absent from
    # their softmax and the whole loss is a single cross-entropy with text targets shifted by 1.
    pool = torch.cat([cand_video, word_emb.to(cand_video.dtype)])
    pred = torch.cat([pred_video, pred_text])
    pool_logits = _at_least_fp32(pred @ pool.t())
    if lm_bias is not None:
        pool_logits = torch.cat([pool_logits[:, :Nc], pool_logits[:, Nc:] + lm_bias], dim=1)
    positive = (pred_video * pos_video).sum(-1).to(pool_logits.dtype)
    absent = torch.full((Nt,), float("-inf"), dtype=positive.dtype, device=positive.device)
    logits = torch.cat([torch.cat([positive, absent])[:, None], pool_logits], dim=1)
    target = torch.cat([torch.zeros(Nv, dtype=torch.long, device=logits.device),
                        text_targets.long().to(logits.device) + 1 + Nc])

    per_token = F.cross_entropy(logits, target, reduction="none")
    loss = per_token.sum() / max(Nv + Nt, 1)
    logs = _logs(loss.device, loss=loss, loss_video=per_token[:Nv].sum() / max(Nv, 1),
                 loss_text=per_token[Nv:].sum() / max(Nt, 1),
                 acc_video=_accuracy(logits[:Nv], target[:Nv]), acc_text=_accuracy(logits[Nv:], target[Nv:]),
                 chance_acc_video=_video_chance(Nc), n_video=float(Nv), n_text=float(Nt))
    return loss, logs


def mfm_mlm_loss(pred_video: torch.Tensor, pos_video: torch.Tensor, cand_video: torch.Tensor,
                 text_logits: torch.Tensor, text_targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The MFM-MLM baseline: NCE for video plus ordinary MLM for text, summed.

    Video (MFM): logits [h.pos, h.cand_video (Nc)], target 0, mean cross-entropy over Nv.
    Text (MLM): ``text_logits`` [..., V] against ``text_targets`` [...] (either the gathered [Nt]
    ids or the full [B, Lt] map with ``IGNORE_INDEX``), mean over the predicted tokens.
    An empty part contributes 0 (still with a grad_fn). Returns ``loss_video + loss_text``, logs.
    """
    Nv = pred_video.shape[0]
    video_logits = torch.cat([(pred_video * pos_video).sum(-1, keepdim=True),
                              pred_video @ cand_video.t()], dim=1)
    video_logits = _at_least_fp32(video_logits)
    video_target = torch.zeros(Nv, dtype=torch.long, device=video_logits.device)
    loss_video = F.cross_entropy(video_logits, video_target, reduction="sum") / max(Nv, 1)

    text_logits = _at_least_fp32(text_logits.reshape(-1, text_logits.shape[-1]))
    text_targets = text_targets.reshape(-1).long()
    predicted = text_targets != IGNORE_INDEX
    Nt = int(predicted.sum())
    loss_text = F.cross_entropy(text_logits, text_targets, ignore_index=IGNORE_INDEX,
                                reduction="sum") / max(Nt, 1)

    loss = loss_video + loss_text
    logs = _logs(loss.device, loss=loss, loss_video=loss_video, loss_text=loss_text,
                 acc_video=_accuracy(video_logits, video_target),
                 acc_text=_accuracy(text_logits[predicted], text_targets[predicted]),
                 chance_acc_video=_video_chance(cand_video.shape[0]), n_video=float(Nv), n_text=float(Nt))
    return loss, logs


OBJECTIVES = {"masked_token": masked_token_loss, "mfm_mlm": mfm_mlm_loss}
"""``ObjectiveConfig.name`` -> loss function (note: the two take different text inputs)."""
