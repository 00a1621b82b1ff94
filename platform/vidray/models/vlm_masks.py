"""Attention masks of the VLM sequence ``[CLS] video [SEP] text``: which slot may attend to which.

Every mask is bool ``[B, L, L]`` with ``L = Lv + Lt + 2``; ``mask[b, q, k]`` is True when query slot
``q`` may attend to key slot ``k``. The slots are fixed (see :mod:`vidray.models.vlm`): 0 = [CLS],
``1..Lv`` = video, ``Lv+1`` = the [SEP] after the video, ``Lv+2..`` = text (its own final [SEP]
included, then padding).

- ``full`` (pre-training): every valid slot sees every valid slot.
- ``isolated`` (retrieval, MC-QA): the video side (video + first [SEP]) and the text side (text
  + its final [SEP]) only see themselves, so one forward pass encodes both independently; [CLS]
  is out of play (it sees only itself and nobody sees it).
- ``causal_text`` (captioning): [CLS], video and the first [SEP] see each other; text slot j sees
  them plus text slots <= j.

Padded slots (``video_mask``/``text_mask`` False) are never attended to; their own rows attend
only to themselves, so that softmax has something to normalise and no NaN appears.
"""

from __future__ import annotations

from typing import Callable

import torch

# Region of each slot: which side of the sequence it belongs to.
CLS_REGION, VIDEO_REGION, TEXT_REGION = 0, 1, 2


def valid_slots(video_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """bool ``[B, L]``: [CLS] and the first [SEP] always, video and text slots where their mask is True."""
    always = torch.ones(video_mask.shape[0], 1, dtype=torch.bool, device=video_mask.device)
    return torch.cat([always, video_mask.bool(), always, text_mask.bool()], dim=1)


def slot_regions(lv: int, lt: int, device: torch.device | str | None = None) -> torch.Tensor:
    """long ``[L]``: CLS_REGION for [CLS], VIDEO_REGION for video + first [SEP], TEXT_REGION for text."""
    regions = torch.full((lv + lt + 2,), VIDEO_REGION, dtype=torch.long, device=device)
    regions[0] = CLS_REGION
    regions[lv + 2:] = TEXT_REGION
    return regions


def restrict_to_valid(allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Apply key padding to a pattern ``allowed`` ([L, L] or [B, L, L]) given ``valid`` [B, L].

    Nobody attends to a padded slot, a padded slot attends only to itself, and every slot may
    attend to itself (a row with nothing to attend to would make SDPA return NaN).
    """
    length = valid.shape[1]
    allowed = allowed.bool() & valid[:, None, :] & valid[:, :, None]
    return allowed | torch.eye(length, dtype=torch.bool, device=valid.device)


def full_mask(video_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Every valid slot attends to every valid slot."""
    valid = valid_slots(video_mask, text_mask)
    return restrict_to_valid(torch.ones((), dtype=torch.bool, device=valid.device), valid)


def isolated_mask(video_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Video (+ first [SEP]) sees only video; text (+ its final [SEP]) sees only text; [CLS] is out."""
    valid = valid_slots(video_mask, text_mask)
    regions = slot_regions(video_mask.shape[1], text_mask.shape[1], valid.device)
    # [CLS] gets nothing here: restrict_to_valid leaves it its own diagonal cell only.
    same_side = (regions[:, None] == regions[None, :]) & (regions[:, None] != CLS_REGION)
    return restrict_to_valid(same_side, valid)


def causal_text_mask(video_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """[CLS] + video + first [SEP] see each other; text slot j also sees text slots <= j."""
    valid = valid_slots(video_mask, text_mask)
    lv, lt = video_mask.shape[1], text_mask.shape[1]
    is_text = slot_regions(lv, lt, valid.device) == TEXT_REGION
    index = torch.arange(lv + lt + 2, device=valid.device)
    earlier_text = is_text[:, None] & is_text[None, :] & (index[None, :] <= index[:, None])
    return restrict_to_valid(~is_text[None, :] | earlier_text, valid)


MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

ATTENTION_MASKS: dict[str, MaskFn] = {
    "full": full_mask,
    "isolated": isolated_mask,
    "causal_text": causal_text_mask,
}
