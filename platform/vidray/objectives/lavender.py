"""LAVENDER's tasks, all as masked language modelling with the one MLM head (REFERENCE.md).

- the matching [MASK]: appended after the text's padding, at position ``size_txt``
  (``model.max_text_tokens``), as the official code does (:func:`append_mask_slot`).
- pre-training: MLM on 15% of the text tokens, always [MASK]; video-text matching as MLM: each
  clip is read with its own text (target "true" at the [MASK]) and with ``vtm_negatives`` texts
  drawn at random from the other rows of the batch (target "false"), all of them the MLM-masked
  texts, as the official main_pretrain_mlm.py pairs them (:func:`sampled_pairs`).
- retrieval: trained as that matching over every (clip, text) pair of the batch, B x B, "true" on
  the diagonal (official main_retrieval_mlm.py; ``match_negatives`` samples fewer, as
  pre-training does); a pair scores p(true) / (p(true) + p(false)) at the slot, so evaluation
  runs every pair through the model (no separate passes).
- open-ended QA: "question answer: [MASK]" and the answer is one word of the vocabulary; an answer
  that is not a single WordPiece cannot be produced and counts wrong (it trains nothing).
- multiple-choice QA: each option is its own row, "question [SEP] option [MASK]" with its clip,
  target "true" for the right option and "false" for the others (the matching above, with the
  wrong options as the negatives); the option with the highest p(true) / (p(true) + p(false)) wins.
- multi-task: rows of several tasks in one batch, each row tagged with its task; each task's rows
  go through that task's loss and the losses are summed (the paper's single head for all tasks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidray.models.build import build_net
from vidray.models.weights import text_tokenizer
from vidray.objectives.masking import IGNORE_INDEX


def insert_mask_slot(text_ids: torch.Tensor, text_mask: torch.Tensor, prefix: list[int], mask_id: int,
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row ``[CLS] w .. [SEP]`` becomes ``[CLS] w .. <prefix> [MASK] [SEP]``; returns the
    ids, their mask and the [MASK] slot of every row. Open-ended QA's "answer: [MASK]" (the
    official main_qaoe_mlm.py writes it inside the text, before [SEP]); matching uses
    :func:`append_mask_slot`."""
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


def append_mask_slot(text_ids: torch.Tensor, text_mask: torch.Tensor, size_txt: int,
                     mask_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matching [MASK] where the official code puts it (dataset.py, append_mask_tok2txt): every
    text padded to ``size_txt`` tokens, then the [MASK], at position ``size_txt``. Returns the ids,
    their mask, their position ids and the [MASK] slot of every row.

    The padding is masked out of attention and BERT's positions are absolute, so the [MASK] goes
    right after this batch's padding (column W, the batch's text width) with position id
    ``size_txt``: the same states as the fully padded text, on W + 1 text tokens, not size_txt + 1."""
    b, width = text_ids.shape
    if width > size_txt:
        raise ValueError(f"texts of {width} tokens exceed size_txt={size_txt}")
    ids = torch.cat([text_ids, torch.full((b, 1), mask_id, dtype=text_ids.dtype, device=text_ids.device)], 1)
    mask = torch.cat([text_mask, torch.ones(b, 1, dtype=torch.bool, device=text_mask.device)], 1)
    positions = torch.arange(width + 1, device=text_ids.device).repeat(b, 1)
    positions[:, width] = size_txt
    slots = torch.full((b,), width, dtype=torch.long, device=text_ids.device)
    return ids, mask, positions, slots


def true_score(logits: torch.Tensor, true_id: int, false_id: int) -> torch.Tensor:
    """p(true) / (p(true) + p(false)) from slot logits ``[B, V]``: a softmax over the two words.
    The official eval (main_retrieval_mlm.py, eval_retrieval_mlm.py) divides the raw logits,
    l_true / (l_true + l_false): logits are not probabilities, and where their signs differ that
    ratio flips or blows up (l_true = -1, l_false = -3 gives 0.25 for a pair far more "true"
    than l_true = l_false = 1's 0.5). The ratio of the probabilities ranks pairs by how much more
    likely "true" is than "false" (it is sigmoid(l_true - l_false)) whatever the logits' signs, and
    a shift of every logit leaves it as it is (docs/fidelity.md)."""
    return torch.softmax(logits[:, [true_id, false_id]].float(), dim=-1)[:, 0]


class Words:
    """The token ids LAVENDER's tasks use, from the tokenizer."""

    def __init__(self, tokenizer_name: str):
        tok = self.tokenizer = text_tokenizer(tokenizer_name)
        self.mask, self.pad, self.sep = tok.mask_token_id, tok.pad_token_id, tok.sep_token_id
        self.true, self.false = tok.convert_tokens_to_ids("true"), tok.convert_tokens_to_ids("false")
        self.answer_prefix = tok("answer:", add_special_tokens=False)["input_ids"]
        self.vocab = len(tok)
        self.special = tuple(tok.all_special_ids)

    def answer_token(self, answer: str) -> int:
        """The one WordPiece of an answer, or IGNORE_INDEX if it has several (out of vocabulary)."""
        ids = self.tokenizer(answer.lower(), add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else IGNORE_INDEX


def all_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip, text) row indices of every pair of a batch of ``n``, clip-major, as the official
    retrieval fine-tuning loops them (main_retrieval_mlm.py: for video i, for text j)."""
    return torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)


def sampled_pairs(n: int, negatives: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip, text) row indices, clip-major: each clip with its own text, then with ``negatives``
    texts of other rows drawn without replacement (at most n - 1), as the official pre-training
    does (main_pretrain_mlm.py: a random permutation of the rows j != i, its first
    min(B, 4) - 1)."""
    k = min(negatives, n - 1)
    rows = torch.arange(n)
    draw = torch.rand(n, n - 1, generator=generator).argsort(dim=1)[:, :k]   # positions among the others
    others = draw + (draw >= rows[:, None]).long()                            # skip the clip's own row
    return rows.repeat_interleave(k + 1), torch.cat([rows[:, None], others], dim=1).flatten()


def match_targets(clips: torch.Tensor, texts: torch.Tensor, words: Words) -> torch.Tensor:
    """The word each pair's [MASK] should read: "true" where its clip and text are the same row,
    "false" elsewhere. The official retrieval compares video ids; a batch here holds each clip once
    with one caption, so the same clip is the same row."""
    return torch.where(clips == texts, words.true, words.false)


def matching_batch(frames, text_ids, text_mask, words: Words, size_txt: int, negatives: int | None = None,
                   generator: torch.Generator | None = None) -> tuple:
    """Matching inputs of a batch (see :func:`matching_loss`): the texts with their [MASK] slot and
    the (clip, text) pairs: all B x B (``negatives`` None), or each clip with its own text and
    ``negatives`` random others."""
    ids, mask, positions, slots = append_mask_slot(text_ids, text_mask, size_txt, words.mask)
    clips, texts = all_pairs(len(ids)) if negatives is None else sampled_pairs(len(ids), negatives, generator)
    return frames, ids, mask, positions, slots, clips, texts, match_targets(clips, texts, words)


def option_pairs(frames, text_ids, text_mask, match, words: Words, size_txt: int) -> tuple:
    """MC rows (question + one option each) with a [MASK] slot, each paired with its own clip:
    target "true" where ``match`` is 1 (the right option), "false" where it is 0 (the official
    main_retmc_mlm.py appends the [MASK] as retrieval does)."""
    ids, mask, positions, slots = append_mask_slot(text_ids, text_mask, size_txt, words.mask)
    rows = torch.arange(len(ids))
    targets = torch.where(match.cpu() == 1, words.true, words.false)
    return tuple(t.to(frames.device) for t in (frames, ids, mask, positions, slots, rows, rows, targets))


def match_logits(net: nn.Module, video, ids, mask, positions, slots, clips, texts) -> torch.Tensor:
    """Vocabulary logits at the [MASK] of every (clip, text) pair, ``[pairs, V]``: each clip's
    video tokens computed once and fused with each of its texts (the official go_feat, then
    go_cross on the pairs)."""
    return net(None, ids[texts], mask[texts], video=video[clips], slots=slots[texts], positions=positions[texts])


def matching_loss(net: nn.Module, frames, ids, mask, positions, slots, clips, texts, pair_targets):
    """Cross-entropy of the word at each pair's [MASK] against "true"/"false", over the whole
    vocabulary (the one MLM head), and the share of pairs whose top word is the target."""
    at_slot = match_logits(net, net.video_tokens(frames), ids, mask, positions, slots, clips, texts)
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

    def forward(self, frames, ids, mask, positions, mlm_targets, slots, clips, texts, pair_targets):
        """``ids``: the MLM-masked texts with the matching [MASK] appended; both passes read them
        and share the clips' video tokens, as the official pre-training does."""
        video = self.net.video_tokens(frames)
        logits = self.net(None, ids, mask, video=video, positions=positions)
        mlm = torch.nan_to_num(F.cross_entropy(logits.float().flatten(0, 1), mlm_targets.flatten(),
                                               ignore_index=IGNORE_INDEX))
        at_slot = match_logits(self.net, video, ids, mask, positions, slots, clips, texts)
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

    def forward(self, frames, ids, mask, positions, slots, clips, texts, pair_targets):
        return matching_loss(self.net, frames, ids, mask, positions, slots, clips, texts, pair_targets)


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


def finetune_model(net: nn.Module, task: str, tasks: list[str]) -> nn.Module:
    """The module that trains ``task`` (``multi``: every task of ``tasks``) on ``net``."""
    if task == "multi":
        return LavenderMultiTaskModel(net, tasks)
    return LavenderQAModel(net) if task == "qa" else LavenderRetrievalModel(net)


@torch.no_grad()
def pair_scores(net: nn.Module, words: Words, frames: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor, batch_size: int, size_txt: int) -> torch.Tensor:
    """``[N_text, N_video]`` p(true) / (p(true) + p(false)) of every text against every clip.
    Each chunk of clips goes through the video encoder once and is then fused with every text,
    reading the vocabulary at the [MASK] slot only (BENCHMARKS.md, retrieval_eval: 5x faster than
    re-encoding the clip and projecting every slot, per pair)."""
    ids, mask, positions, slots = append_mask_slot(text_ids, text_mask, size_txt, words.mask)
    columns = []
    for start in range(0, len(frames), batch_size):
        video = net.video_tokens(frames[start:start + batch_size])
        n = len(video)
        columns.append(torch.stack([
            true_score(net(None, ids[t:t + 1].expand(n, -1), mask[t:t + 1].expand(n, -1), video=video,
                           slots=slots[t:t + 1].expand(n), positions=positions[t:t + 1].expand(n, -1)),
                       words.true, words.false)
            for t in range(len(ids))]))
    return torch.cat(columns, dim=1)


def task_model(cfg) -> nn.Module:
    """The untrained module a fine-tuning run of ``cfg`` trains (evaluation loads a checkpoint's
    weights into it): ``cfg.task``'s module on the LAVENDER net of ``model.*``."""
    return finetune_model(build_net(cfg.model), cfg.task, cfg.tasks)
