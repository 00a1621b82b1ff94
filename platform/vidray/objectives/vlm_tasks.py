"""Fine-tuning heads of VLM: one BERT, a different attention mask per task (REFERENCE.md).

- :class:`RetrievalModel`: ``isolated`` mask, mean-pooled video (+ the [SEP] after it) and text
  (+ its final [SEP]) states as MMPT pools them, contrastive loss text -> video over the batch.
  Because the mask isolates the sides, one joint forward pass gives exactly the states of two
  separate passes, so evaluation encodes texts and videos separately (O(N) passes, not O(N^2))
  with :meth:`encode_text` / :meth:`encode_video`.
- :class:`CaptioningModel`: ``causal_text`` mask, text shifted right with [CLS] as BOS, BERT's
  tied LM head predicts the next token; :meth:`next_token_log_probs` drives greedy/beam search.
- :class:`SegmentationModel`: a linear classifier on every video slot (one per second), video
  only (the text side is a lone [SEP]) under the ``isolated`` mask, as the paper and MMPT's COIN
  setup (``num_iso_layer: 12``) do: the video sees neither [CLS] nor the dummy text.

Each ``forward(**batch)`` returns ``(loss, logs)``, the contract of the training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidray.models.vlm import CLS_ID, SEP_ID, VLM, pool, sequence_slices
from vidray.objectives.contrastive import contrastive_loss
from vidray.objectives.masking import IGNORE_INDEX


def _lone_sep(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A text side holding only its final [SEP]: for passes that encode video alone."""
    return (torch.full((batch, 1), SEP_ID, dtype=torch.long, device=device),
            torch.ones(batch, 1, dtype=torch.bool, device=device))


def freeze_lm_head(vlm: VLM) -> None:
    """Tasks that never read the LM head leave it out of training: DDP would otherwise wait for
    gradients that never come (and the head stays as pre-trained, should anyone reuse it)."""
    for parameter in [vlm.lm_bias, *vlm.head_transform.parameters()]:
        parameter.requires_grad_(False)


class RetrievalModel(nn.Module):
    def __init__(self, vlm: VLM):
        super().__init__()
        self.vlm = vlm
        freeze_lm_head(vlm)

    def forward(self, video, video_mask, text_ids, text_mask):
        hidden = self.vlm(video, video_mask, text_ids, text_mask, attention="isolated")
        video_vec, text_vec = pool(hidden, video_mask, text_mask)
        # MMPT's: text -> video over this worker's batch, no temperature (vidray.objectives.contrastive).
        loss, t2v, target = contrastive_loss(text_vec, video_vec)
        with torch.no_grad():
            accuracy = (t2v.argmax(1) == target).float().mean()
        return loss, {"t2v_batch_accuracy": accuracy.item()}

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` pooled video states, from a pass that carries no text."""
        text_ids, text_mask = _lone_sep(len(video), video.device)
        hidden = self.vlm(video, video_mask, text_ids, text_mask, attention="isolated")
        return pool(hidden, video_mask, text_mask)[0]

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` pooled text states, from a pass whose one video slot is padding."""
        batch = len(text_ids)
        video = torch.zeros(batch, 1, self.vlm.video_mlp[0].in_features, device=text_ids.device)
        video_mask = torch.zeros(batch, 1, dtype=torch.bool, device=text_ids.device)
        hidden = self.vlm(video, video_mask, text_ids, text_mask, attention="isolated")
        return pool(hidden, video_mask, text_mask)[1]


def shift_right(text_ids: torch.Tensor, text_mask: torch.Tensor, bos: int = CLS_ID):
    """Teacher forcing: inputs ``[BOS, t1 .. tn]`` for the targets ``[t1 .. tn, SEP]``; returns
    (input ids, input mask). Both have n + 1 valid slots, so the mask is the text's own (the
    final [SEP] lands on the first padded slot and stays out of play)."""
    first = torch.full_like(text_ids[:, :1], bos)
    return torch.cat([first, text_ids[:, :-1]], dim=1), text_mask


class CaptioningModel(nn.Module):
    def __init__(self, vlm: VLM):
        super().__init__()
        self.vlm = vlm

    def text_logits(self, video, video_mask, inputs, input_mask) -> torch.Tensor:
        """``[B, Lt, V]``: next-token logits at every text slot under the causal text mask."""
        hidden = self.vlm(video, video_mask, inputs, input_mask, attention="causal_text")
        text_slots = sequence_slices(video_mask.shape[1], inputs.shape[1])[1]
        return self.vlm.lm_logits(hidden[:, text_slots])

    def forward(self, video, video_mask, text_ids, text_mask):
        inputs, input_mask = shift_right(text_ids, text_mask)
        logits = self.text_logits(video, video_mask, inputs, input_mask)
        targets = text_ids.masked_fill(~text_mask, IGNORE_INDEX)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        with torch.no_grad():
            hit = (logits.argmax(-1) == targets)[text_mask].float().mean()
        return loss, {"token_accuracy": hit.item()}

    @torch.no_grad()
    def next_token_log_probs(self, video, video_mask, prefixes: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` log-probabilities of the token after each prefix (``[BOS, y1 ..]``)."""
        mask = torch.ones_like(prefixes, dtype=torch.bool)
        logits = self.text_logits(video, video_mask, prefixes, mask)[:, -1]
        return torch.log_softmax(logits.float(), dim=-1)


class SegmentationModel(nn.Module):
    def __init__(self, vlm: VLM, num_classes: int):
        super().__init__()
        self.vlm = vlm
        freeze_lm_head(vlm)
        self.classifier = nn.Linear(vlm.hidden_size, num_classes)

    def logits(self, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """``[B, Lv, K]``: class logits of every video slot (second)."""
        text_ids, text_mask = _lone_sep(len(video), video.device)
        # Isolated, not full: MMPT fine-tunes and tests COIN with every layer isolated.
        hidden = self.vlm(video, video_mask, text_ids, text_mask, attention="isolated")
        return self.classifier(hidden[:, sequence_slices(video_mask.shape[1], 1)[0]])

    def forward(self, video, video_mask, labels):
        logits = self.logits(video, video_mask)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        with torch.no_grad():
            labelled = labels != IGNORE_INDEX
            accuracy = (logits.argmax(-1) == labels)[labelled].float().mean()
        return loss, {"frame_accuracy": accuracy.item()}


def build_task_model(task: str, vlm: VLM, num_classes: int | None = None) -> nn.Module:
    if task == "retrieval":
        return RetrievalModel(vlm)
    if task == "captioning":
        return CaptioningModel(vlm)
    if task == "action_segmentation":
        if not num_classes:
            raise ValueError("action_segmentation needs the number of classes (from data.labels)")
        return SegmentationModel(vlm, num_classes)
    raise ValueError(f"unknown task {task!r}")
