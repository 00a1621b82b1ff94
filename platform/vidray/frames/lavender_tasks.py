"""LAVENDER's tasks, all as masked language modelling with the one MLM head (REFERENCE.md).

- pre-training: MLM on 15% of the text tokens, always [MASK]; video-text matching as MLM: the
  text gets a [MASK] before its final [SEP] whose target is "true" for its own clip and "false"
  for ``negatives`` other clips of the batch (1 positive + 3 negatives in the paper).
- retrieval: trained as that matching; a (text, video) pair scores p(true) / (p(true) + p(false))
  at the slot, so evaluation runs every pair through the model (no separate passes).
- open-ended QA: "question answer: [MASK]" and the answer is one word of the vocabulary; an answer
  that is not a single WordPiece cannot be produced and counts wrong (it trains nothing).
- multiple-choice QA: each option is its own row, "question [SEP] option [MASK]" with its clip,
  target "true" for the right option and "false" for the others (the matching above, with the
  wrong options as the negatives); the option with the highest p(true) / (p(true) + p(false)) wins.
- multi-task: rows of several tasks in one batch, each row tagged with its task; each task's rows
  go through that task's loss and the losses are summed (the paper's single head for all tasks).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vidray.frames.config import FINETUNE_TASKS
from vidray.frames.data import IGNORE_INDEX, collate, tokenizer_for


def insert_mask_slot(text_ids: torch.Tensor, text_mask: torch.Tensor, prefix: list[int], mask_id: int,
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row ``[CLS] w .. [SEP]`` becomes ``[CLS] w .. <prefix> [MASK] [SEP]``; returns the
    ids, their mask and the [MASK] slot of every row."""
    lengths = text_mask.sum(1).tolist()
    extra = len(prefix) + 1
    ids = torch.full((len(text_ids), text_ids.shape[1] + extra), pad_id, dtype=text_ids.dtype)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    slots = torch.empty(len(text_ids), dtype=torch.long)
    for row, n in enumerate(lengths):
        body = text_ids[row, :n - 1].tolist()                  # everything before the final [SEP]
        new = body + prefix + [mask_id, int(text_ids[row, n - 1])]
        ids[row, :len(new)] = torch.tensor(new)
        mask[row, :len(new)] = True
        slots[row] = len(body) + len(prefix)
    return ids.to(text_ids.device), mask.to(text_ids.device), slots.to(text_ids.device)


def true_score(logits: torch.Tensor, true_id: int, false_id: int) -> torch.Tensor:
    """p(true) / (p(true) + p(false)) from slot logits ``[B, V]``: a softmax over the two words."""
    return torch.softmax(logits[:, [true_id, false_id]].float(), dim=-1)[:, 0]


class Words:
    """The token ids LAVENDER's tasks use, from the tokenizer."""

    def __init__(self, tokenizer_name: str):
        tok = self.tokenizer = tokenizer_for(tokenizer_name)
        self.mask, self.pad, self.sep = tok.mask_token_id, tok.pad_token_id, tok.sep_token_id
        self.true, self.false = tok.convert_tokens_to_ids("true"), tok.convert_tokens_to_ids("false")
        self.answer_prefix = tok("answer:", add_special_tokens=False)["input_ids"]
        self.vocab = len(tok)
        self.special = tuple(tok.all_special_ids)

    def answer_token(self, answer: str) -> int:
        """The one WordPiece of an answer, or IGNORE_INDEX if it has several (out of vocabulary)."""
        ids = self.tokenizer(answer.lower(), add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else IGNORE_INDEX


def matching_batch(frames, text_ids, text_mask, words: Words, negatives: int):
    """Texts with a [MASK] slot, each paired with its own clip (target "true") and with the clips
    1..``negatives`` places along the batch (target "false"): ``(1 + negatives) * B`` pairs."""
    ids, mask, slots = insert_mask_slot(text_ids, text_mask, [], words.mask, words.pad)
    negatives = min(negatives, len(frames) - 1)
    rolls = range(negatives + 1)
    targets = torch.cat([torch.full((len(frames),), words.true if r == 0 else words.false, dtype=torch.long)
                         for r in rolls]).to(frames.device)
    return (torch.cat([frames.roll(r, dims=0) for r in rolls]), ids.repeat(len(rolls), 1),
            mask.repeat(len(rolls), 1), slots.repeat(len(rolls)), targets)


def option_pairs(frames, text_ids, text_mask, match, words: Words):
    """MC rows (question + one option each) with a [MASK] slot, paired with their own clip: target
    "true" where ``match`` is 1 (the right option), "false" where it is 0."""
    ids, mask, slots = insert_mask_slot(text_ids, text_mask, [], words.mask, words.pad)
    targets = torch.where(match.cpu() == 1, words.true, words.false)
    return frames, ids.to(frames.device), mask.to(frames.device), slots.to(frames.device), targets.to(frames.device)


def matching_loss(net: nn.Module, pair_frames, pair_ids, pair_mask, slots, pair_targets):
    """Cross-entropy of the word at each pair's [MASK] against "true"/"false", over the whole
    vocabulary (the one MLM head), and the share of pairs whose top word is the target."""
    at_slot = net(pair_frames, pair_ids, pair_mask, slots=slots)
    loss = F.cross_entropy(at_slot.float(), pair_targets)
    with torch.no_grad():
        accuracy = (at_slot.argmax(-1) == pair_targets).float().mean()
    return loss, {"match_accuracy": accuracy.item()}


def answer_loss(net: nn.Module, frames, qa_ids, qa_mask, slots, answer_token):
    """Cross-entropy of the answer word at the [MASK] after "answer:" (0 when no answer is a word)."""
    at_slot = net(frames, qa_ids, qa_mask, slots=slots)
    loss = torch.nan_to_num(F.cross_entropy(at_slot.float(), answer_token, ignore_index=IGNORE_INDEX))
    with torch.no_grad():
        accuracy = (at_slot.argmax(-1) == answer_token).float().mean()
    return loss, {"qa_batch_accuracy": accuracy.item()}


# Each task's loss on its inputs: MC options are matched pairs, as retrieval's.
TASK_LOSSES = {"retrieval": matching_loss, "qa": answer_loss, "mc": matching_loss}


class LavenderPretrainModel(nn.Module):
    def __init__(self, net: nn.Module, vtm_weight: float):
        super().__init__()
        self.net, self.vtm_weight = net, vtm_weight

    def forward(self, frames, masked_ids, text_mask, mlm_targets, pair_frames, pair_ids, pair_mask, slots,
                pair_targets):
        logits = self.net(frames, masked_ids, text_mask)
        mlm = torch.nan_to_num(F.cross_entropy(logits.float().flatten(0, 1), mlm_targets.flatten(),
                                               ignore_index=IGNORE_INDEX))
        at_slot = self.net(pair_frames, pair_ids, pair_mask, slots=slots)
        vtm = F.cross_entropy(at_slot.float(), pair_targets)
        with torch.no_grad():
            accuracy = (at_slot.argmax(-1) == pair_targets).float().mean()
        return mlm + self.vtm_weight * vtm, {"mlm_loss": mlm.item(), "vtm_loss": vtm.item(),
                                             "vtm_accuracy": accuracy.item()}


class LavenderRetrievalModel(nn.Module):
    """Video-text matching at the [MASK]: retrieval's (caption, clip) pairs, and MC's (question +
    option, clip) pairs (task=mc trains this model too)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pair_frames, pair_ids, pair_mask, slots, pair_targets):
        return matching_loss(self.net, pair_frames, pair_ids, pair_mask, slots, pair_targets)


class LavenderQAModel(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, frames, qa_ids, qa_mask, slots, answer_token):
        return answer_loss(self.net, frames, qa_ids, qa_mask, slots, answer_token)


class LavenderMultiTaskModel(nn.Module):
    """Several tasks through the one net and head in one forward (so DDP sees one forward per
    backward): each task's inputs (a tuple, or None when the batch has none of its rows) go through
    that task's loss; the loss is their sum. Holds the net only, so its checkpoint's weights are
    those of any single-task LAVENDER model (``net.*``)."""

    def __init__(self, net: nn.Module, tasks: list[str]):
        super().__init__()
        self.net, self.tasks = net, list(tasks)

    def forward(self, **inputs):
        total, logs = None, {}
        for task in self.tasks:
            if inputs.get(task) is None:
                continue
            loss, task_logs = TASK_LOSSES[task](self.net, *inputs[task])
            total = loss if total is None else total + loss
            logs[f"{task}_loss"] = loss.item()
            logs.update({k if k.startswith(task) else f"{task}_{k}": v for k, v in task_logs.items()})
        return total, logs


# --- systems (what the training loop needs) --------------------------------------------------------

class LavenderPretrainSystem:
    def __init__(self, cfg, device: torch.device):
        from vidray.frames.system import build_net

        self.cfg, self.words = cfg, Words(cfg.model.tokenizer)
        self.model = LavenderPretrainModel(build_net(cfg.model), cfg.objective.vtm_weight).to(device)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.collate = partial(collate, max_text_tokens=cfg.model.max_text_tokens, pad_id=self.words.pad)

    def _step(self, batch: dict, generator: torch.Generator):
        from vidray.frames.system import mask_text

        w, device = self.words, batch["frames"].device
        ids, mask = batch["text_ids"].cpu(), batch["text_mask"].cpu()
        inputs, targets = mask_text(ids, mask, self.cfg.objective.mlm_prob, w.mask, w.vocab, generator,
                                    w.special, always_mask=True)
        pair = matching_batch(batch["frames"], ids, mask, w, self.cfg.objective.vtm_negatives)
        return self.model(batch["frames"], inputs.to(device), batch["text_mask"], targets.to(device),
                          *(t.to(device) for t in pair))

    def training_step(self, batch: dict):
        return self._step(batch, self.generator)

    def validation_step(self, batch: dict, generator: torch.Generator) -> dict[str, float]:
        loss, logs = self._step(batch, generator)
        return {"loss": loss.item(), **logs}


def finetune_model(net: nn.Module, task: str, tasks: list[str]) -> nn.Module:
    """The module that trains ``task`` (``multi``: every task of ``tasks``) on ``net``."""
    if task == "multi":
        return LavenderMultiTaskModel(net, tasks)
    return LavenderQAModel(net) if task == "qa" else LavenderRetrievalModel(net)


def rows_of(batch: dict, rows: torch.Tensor) -> dict:
    """The ``rows`` of a collated batch, text padding cut to its longest row: the same tensors the
    collation of those rows alone gives."""
    out = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}
    width = int(out["text_mask"].sum(1).max()) if len(out["text_mask"]) else 0
    out["text_ids"], out["text_mask"] = out["text_ids"][:, :width], out["text_mask"][:, :width]
    return out


class LavenderFinetuneSystem:
    """One task, or (task=multi) several: each batch row carries its task's index (``task``, in
    FINETUNE_TASKS) and each task's rows make that task's inputs."""

    def __init__(self, cfg, net: nn.Module, device: torch.device):
        self.cfg, self.words = cfg, Words(cfg.model.tokenizer)
        self.task = cfg.task
        self.model = finetune_model(net, cfg.task, cfg.tasks).to(device)
        self.answer_tokens = torch.tensor([self.words.answer_token(a) for a in cfg.answers] or [IGNORE_INDEX])
        self.collate = partial(collate, max_text_tokens=cfg.model.max_text_tokens, pad_id=self.words.pad)
        self.inputs = {"retrieval": self.retrieval_inputs, "qa": self.qa_step_inputs, "mc": self.mc_inputs}

    def qa_inputs(self, batch: dict):
        """Question ids with "answer: [MASK]" and, if the batch has answers, their token ids."""
        w = self.words
        ids, mask, slots = insert_mask_slot(batch["text_ids"].cpu(), batch["text_mask"].cpu(),
                                            w.answer_prefix, w.mask, w.pad)
        tokens = None
        if "answer" in batch:
            index = batch["answer"].cpu()
            tokens = torch.where(index >= 0, self.answer_tokens[index.clamp(min=0)], IGNORE_INDEX)
        return ids, mask, slots, tokens

    def qa_step_inputs(self, batch: dict) -> tuple:
        device = batch["frames"].device
        ids, mask, slots, tokens = self.qa_inputs(batch)
        return batch["frames"], ids.to(device), mask.to(device), slots.to(device), tokens.to(device)

    def retrieval_inputs(self, batch: dict) -> tuple:
        pair = matching_batch(batch["frames"], batch["text_ids"].cpu(), batch["text_mask"].cpu(), self.words,
                              self.cfg.match_negatives)
        return tuple(t.to(batch["frames"].device) for t in pair)

    def mc_inputs(self, batch: dict) -> tuple:
        return option_pairs(batch["frames"], batch["text_ids"].cpu(), batch["text_mask"].cpu(), batch["match"],
                            self.words)

    def task_inputs(self, batch: dict) -> dict[str, tuple]:
        """Each task's inputs from its rows of a multi-task batch (tasks without rows left out)."""
        task = batch["task"]
        out = {}
        for name in self.cfg.tasks:
            rows = task == FINETUNE_TASKS.index(name)
            if bool(rows.any()):
                out[name] = self.inputs[name](rows_of(batch, rows))
        return out

    def training_step(self, batch: dict):
        if self.task == "multi":
            return self.model(**self.task_inputs(batch))
        return self.model(*self.inputs[self.task](batch))


@torch.no_grad()
def pair_scores(net: nn.Module, words: Words, frames: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[N_text, N_video]`` p(true) / (p(true) + p(false)) of every text against every clip.
    Each chunk of clips goes through the video encoder once and is then fused with every text,
    reading the vocabulary at the [MASK] slot only (BENCHMARKS.md, retrieval_eval: 5x faster than
    re-encoding the clip and projecting every slot, per pair)."""
    ids, mask, slots = insert_mask_slot(text_ids, text_mask, [], words.mask, words.pad)
    columns = []
    for start in range(0, len(frames), batch_size):
        video = net.video_tokens(frames[start:start + batch_size])
        n = len(video)
        columns.append(torch.stack([
            true_score(net(None, ids[t:t + 1].expand(n, -1), mask[t:t + 1].expand(n, -1), video=video,
                           slots=slots[t:t + 1].expand(n)), words.true, words.false)
            for t in range(len(ids))]))
    return torch.cat(columns, dim=1)
