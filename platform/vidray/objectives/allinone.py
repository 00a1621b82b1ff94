"""The objectives of the All-in-one recipe (All-in-one, E-ViLM and the example model), each a module
whose forward returns ``(loss, logs)`` so DDP wraps everything that touches parameters; heads a
task never reads are frozen (DDP would wait for their gradients).

Pre-training: MLM (15% of text tokens, 80/10/10) on each clip's own frames + video-text matching in
a second pass on whole text, where half of the clips get another clip's frames (the batch rolled by
one) and the text [CLS] state says match or not; E-ViLM adds masked video modelling on the first
pass. Fine-tuning: ``retrieval`` (contrastive loss over text-only and video-only passes, both
directions) or ``qa`` (a classifier over the answer vocabulary on a joint pass of question + frames).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidray.models.allinone import AllInOneHeads
from vidray.models.build import build_net
from vidray.models.evilm import mvm_loss, zero_regions
from vidray.objectives.contrastive import contrastive_loss
from vidray.objectives.masking import IGNORE_INDEX

RETRIEVAL_TEMPERATURE = 0.05


def freeze(*modules: nn.Module | nn.Parameter | None) -> None:
    for m in modules:
        if m is None:
            continue
        for p in ([m] if isinstance(m, nn.Parameter) else m.parameters()):
            p.requires_grad_(False)


class PretrainModel(nn.Module):
    """Two joint passes, as ViLT and All-in-one do: MLM on the clips' own frames with masked text,
    VTM on whole text where half of the clips see the next clip's frames. With ``mvm_codes``
    (E-ViLM), the first pass also sees block-masked frames and a head predicts the VQ code of each
    masked region from the decoder's region states (MVM)."""

    def __init__(self, net: AllInOneHeads, vtm_weight: float, mvm_codes: int = 0, mvm_weight: float = 1.0):
        super().__init__()
        self.net, self.vtm_weight, self.mvm_weight = net, vtm_weight, mvm_weight
        h = net.backbone.hidden_size
        self.mvm = (nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=1e-12), nn.Linear(h, mvm_codes))
                    if mvm_codes else None)
        freeze(net.text_proj, net.video_proj)

    def forward(self, frames, text_ids, masked_ids, text_mask, mlm_targets, matched, mvm_masks=None, vq_codes=None):
        inputs = frames if self.mvm is None else zero_regions(frames, mvm_masks)
        states = self.net.backbone(inputs, masked_ids, text_mask)
        lt = masked_ids.shape[1]
        logits = self.net.mlm_logits(states[:, :lt])
        mlm = F.cross_entropy(logits.float().flatten(0, 1), mlm_targets.flatten(), ignore_index=IGNORE_INDEX)
        mlm = torch.nan_to_num(mlm)  # a batch with no masked token
        paired = torch.where(matched.view(-1, 1, 1, 1, 1), frames, frames.roll(1, dims=0))
        vtm_logits = self.net.vtm(self.net.backbone(paired, text_ids, text_mask)[:, 0])
        vtm = F.cross_entropy(vtm_logits.float(), matched.long())
        with torch.no_grad():
            vtm_accuracy = (vtm_logits.argmax(-1) == matched.long()).float().mean()
        loss = mlm + self.vtm_weight * vtm
        logs = {"mlm_loss": mlm.item(), "vtm_loss": vtm.item(), "vtm_accuracy": vtm_accuracy.item()}
        if self.mvm is not None:
            mvm, mvm_accuracy = mvm_loss(self.mvm(states[:, lt:]), vq_codes, mvm_masks.flatten(1))
            loss = loss + self.mvm_weight * mvm
            logs.update(mvm_loss=mvm.item(), mvm_accuracy=mvm_accuracy.item())
        return loss, logs


class RetrievalModel(nn.Module):
    """Contrastive loss both ways against the clips and texts of *every* worker's batch (as CLIP
    trains): with 2 workers each text meets twice the negatives a per-worker loss would give it."""

    def __init__(self, net: AllInOneHeads):
        super().__init__()
        self.net = net
        freeze(net.mlm_transform, net.mlm_bias, net.vtm)

    def forward(self, frames, text_ids, text_mask):
        text, video = self.net.encode_text(text_ids, text_mask), self.net.encode_video(frames)
        loss, t2v, target = contrastive_loss(text, video, temperature=RETRIEVAL_TEMPERATURE, both_ways=True,
                                             across_workers=True)
        with torch.no_grad():
            accuracy = (t2v.argmax(1) == target).float().mean()
        return loss, {"t2v_batch_accuracy": accuracy.item()}


class QAModel(nn.Module):
    def __init__(self, net: AllInOneHeads):
        super().__init__()
        self.net = net
        freeze(net.mlm_transform, net.mlm_bias, net.vtm, net.text_proj, net.video_proj)

    def logits(self, frames, text_ids, text_mask) -> torch.Tensor:
        return self.net.qa(self.net.backbone(frames, text_ids, text_mask)[:, 0])

    def forward(self, frames, text_ids, text_mask, answer):
        logits = self.logits(frames, text_ids, text_mask)
        loss = torch.nan_to_num(F.cross_entropy(logits.float(), answer, ignore_index=IGNORE_INDEX))
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == answer).float().mean()
        return loss, {"qa_batch_accuracy": accuracy.item()}


def task_model(cfg) -> nn.Module:
    """The untrained module a fine-tuning run of ``cfg`` trains (evaluation loads a checkpoint's
    weights into it): the QA classifier or the retrieval towers on the model of ``model.arch``."""
    net = build_net(cfg.model, len(cfg.answers) if cfg.task == "qa" else 0)
    return QAModel(net) if cfg.task == "qa" else RetrievalModel(net)
