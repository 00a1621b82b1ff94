"""Model-agnostic autoregressive decoding for captioning: greedy search and beam search.

The model is seen only through a `StepFn`: given N hypotheses' prefixes (BOS at column 0) and
the batch element each belongs to, it returns next-token log-probabilities [N, V]. The `rows`
argument lets the caller gather each hypothesis' own video features, so one function serves
greedy decoding (one hypothesis per element) and beam search (up to beam_size per element).

Both decoders return, per batch element, the generated tokens without BOS and without EOS.
`step_fn` must return log-probabilities (values <= 0, e.g. a log_softmax): beam search stops an
element early only when no live hypothesis can still beat its best finished one, and that bound
holds because extending a hypothesis never raises its summed log-probability.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Device = torch.device | str | None


def _check_args(batch_size: int, max_len: int, beam_size: int = 1) -> None:
    """Reject sizes that would make the loops below silently return nonsense."""
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")


def _call_step(step_fn: StepFn, prefixes: torch.Tensor, rows: torch.Tensor, eos: int) -> torch.Tensor:
    """step_fn's log-probs [N, V], checked: a wrong shape would otherwise mis-index silently."""
    log_probs = step_fn(prefixes, rows)
    n = prefixes.shape[0]
    if log_probs.dim() != 2 or log_probs.shape[0] != n:
        raise ValueError(f"step_fn must return log-probs of shape [{n}, V], got {tuple(log_probs.shape)}")
    if not 0 <= eos < log_probs.shape[1]:
        raise ValueError(f"eos={eos} is outside the vocabulary of size {log_probs.shape[1]}")
    return log_probs.float()


def greedy_decode(
    step_fn: StepFn, batch_size: int, bos: int, eos: int, max_len: int, *, device: Device = None
) -> list[list[int]]:
    """Pick the most probable next token until EOS or `max_len` tokens, for each batch element.

    Finished elements are no longer passed to `step_fn`, so a batch costs what its longest
    caption costs and no more. `device` is where prefixes and rows are built (the model's
    device); it defaults to the CPU.
    """
    _check_args(batch_size, max_len)
    tokens = torch.full((batch_size, max_len + 1), bos, dtype=torch.long, device=device)
    lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
    active = torch.arange(batch_size, device=device)
    for t in range(max_len):
        if active.numel() == 0:
            break
        log_probs = _call_step(step_fn, tokens[active, : t + 1], active, eos)
        chosen = log_probs.argmax(dim=1).to(tokens.device)
        tokens[active, t + 1] = chosen
        not_eos = chosen != eos
        lengths[active[not_eos]] += 1  # EOS is written (harmlessly) but never counted
        active = active[not_eos]
    return [row[1 : 1 + n].tolist() for row, n in zip(tokens.cpu(), lengths.cpu().tolist())]


@dataclass
class _Beams:
    """Live hypotheses, `beam_size` slots per batch element, live ones packed at the front.

    tokens: [B, K, t] generated tokens (no BOS); scores: [B, K] summed log-probs;
    alive: [B, K] which slots hold a live hypothesis.
    """

    tokens: torch.Tensor
    scores: torch.Tensor
    alive: torch.Tensor


@dataclass
class _Best:
    """Best finished hypothesis per element: tokens [B, max_len] (first `lengths` valid)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    found: torch.Tensor


def _normalize(summed: torch.Tensor, length: int, length_penalty: float) -> torch.Tensor:
    """Hypothesis score: summed log-probs / (generated tokens incl. EOS) ** length_penalty."""
    return summed / float(length) ** length_penalty


def _expand(step_fn: StepFn, beams: _Beams, bos: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every one-token extension of every live hypothesis: (summed scores, validity), [B, K*V].

    Dead slots get -inf and validity False; they sit after live slots in flat order, so a
    stable sort never ranks them above a live hypothesis' own -inf extension.
    """
    batch_size, beam_size, t = beams.tokens.shape
    rows = torch.arange(batch_size, device=beams.alive.device)[:, None].expand(batch_size, beam_size)
    bos_col = torch.full((batch_size, beam_size, 1), bos, dtype=torch.long, device=beams.tokens.device)
    prefixes = torch.cat([bos_col, beams.tokens], dim=2)[beams.alive]
    log_probs = _call_step(step_fn, prefixes, rows[beams.alive], eos).to(beams.scores.device)
    vocab = log_probs.shape[1]
    extended = torch.full((batch_size, beam_size, vocab), float("-inf"), device=beams.scores.device)
    extended[beams.alive] = beams.scores[beams.alive][:, None] + log_probs
    valid = beams.alive[:, :, None].expand(batch_size, beam_size, vocab)
    return extended.reshape(batch_size, -1), valid.reshape(batch_size, -1)


def _record_finished(best: _Best, beams: _Beams, parent: torch.Tensor, token: torch.Tensor,
                     summed: torch.Tensor, finishing: torch.Tensor, length: int,
                     length_penalty: float, eos: int) -> None:
    """Keep, per element, this step's best finishing candidate if it beats the best so far.

    All of this step's finishers have the same length, so the first in rank order is the best;
    ties with an earlier (shorter) finisher keep the earlier one.
    """
    batch_size, width = finishing.shape
    rank = torch.arange(width, device=finishing.device).expand(batch_size, width)
    first = torch.where(finishing, rank, width).min(dim=1).values
    has = first < width
    pick = first.clamp(max=width - 1)[:, None]
    score = _normalize(summed.gather(1, pick)[:, 0], length, length_penalty)
    better = has & (~best.found | (score > best.scores))
    if not bool(better.any()):
        return
    batch_index = torch.arange(batch_size, device=beams.tokens.device)
    parent_tokens = beams.tokens[batch_index, parent.gather(1, pick)[:, 0]]
    last = token.gather(1, pick)[:, 0]
    ends_in_eos = last == eos
    best.tokens[better, : length - 1] = parent_tokens[better]
    best.tokens[better, length - 1] = last[better]
    best.lengths[better] = torch.where(ends_in_eos, length - 1, length)[better]
    best.scores[better] = score[better]
    best.found |= better


def _select_alive(beams: _Beams, parent: torch.Tensor, token: torch.Tensor, summed: torch.Tensor,
                  continuing: torch.Tensor) -> _Beams:
    """The top `beam_size` continuing candidates, packed into slots in rank order."""
    batch_size, beam_size, _ = beams.tokens.shape
    slot = continuing.long().cumsum(dim=1) - 1
    keep = continuing & (slot < beam_size)
    # Candidates not kept are scattered into a spare slot `beam_size`, then dropped.
    slot = torch.where(keep, slot, beam_size)
    batch_index = torch.arange(batch_size, device=slot.device)[:, None].expand_as(slot)
    history = beams.tokens[batch_index, parent]
    new_tokens = torch.cat([history, token[:, :, None]], dim=2)
    tokens = torch.zeros(batch_size, beam_size + 1, new_tokens.shape[2], dtype=torch.long, device=slot.device)
    scores = torch.full((batch_size, beam_size + 1), float("-inf"), device=summed.device)
    alive = torch.zeros(batch_size, beam_size + 1, dtype=torch.bool, device=slot.device)
    tokens[batch_index, slot] = new_tokens
    scores[batch_index, slot] = summed
    alive[batch_index, slot] = keep
    return _Beams(tokens[:, :beam_size], scores[:, :beam_size], alive[:, :beam_size])


def _stop_hopeless(beams: _Beams, best: _Best, length: int, max_len: int, length_penalty: float) -> None:
    """Retire elements none of whose live hypotheses can still beat their best finished one.

    A live hypothesis with sum s <= 0 at `length` tokens finishes with at most s at some length
    L in (length, max_len]; s / L ** penalty is largest at one end of that range.
    """
    top = torch.where(beams.alive, beams.scores, float("-inf")).max(dim=1).values
    bound = torch.maximum(_normalize(top, length + 1, length_penalty), _normalize(top, max_len, length_penalty))
    hopeless = best.found & (bound <= best.scores)
    beams.alive &= ~hopeless[:, None]


def beam_search(
    step_fn: StepFn,
    batch_size: int,
    bos: int,
    eos: int,
    max_len: int,
    beam_size: int = 5,
    length_penalty: float = 0.0,
    *,
    device: Device = None,
) -> list[list[int]]:
    """Best finished hypothesis per batch element under beam search.

    Score = summed log-probs (EOS's included) / (generated tokens incl. EOS) ** length_penalty;
    a hypothesis reaching `max_len` tokens without EOS finishes as it is. Each step ranks all
    extensions of the live beams by summed log-prob (equal to ranking by score: live hypotheses
    share one length); EOS extensions among the top `beam_size` finish, and the best
    `beam_size` non-EOS extensions live on. Nothing is pruned while the beam holds every
    candidate, so a beam as large as the number of possible sequences is exhaustive search;
    with length_penalty=0, beam_size=1 is greedy decoding.
    """
    _check_args(batch_size, max_len, beam_size)
    beams = _Beams(
        tokens=torch.zeros(batch_size, beam_size, 0, dtype=torch.long, device=device),
        scores=torch.zeros(batch_size, beam_size, device=device),
        # One live hypothesis (BOS alone) per element: K copies would fill the beam with duplicates.
        alive=torch.arange(beam_size, device=device)[None, :].expand(batch_size, beam_size) == 0,
    )
    best = _Best(
        tokens=torch.zeros(batch_size, max_len, dtype=torch.long, device=device),
        lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
        scores=torch.full((batch_size,), float("-inf"), device=device),
        found=torch.zeros(batch_size, dtype=torch.bool, device=device),
    )
    for t in range(max_len):
        if not bool(beams.alive.any()):
            break
        extended, valid = _expand(step_fn, beams, bos, eos)
        vocab = extended.shape[1] // beam_size
        # Stable sort: equal scores keep flat order (lower slot, then lower token id).
        summed, order = extended.sort(dim=1, descending=True, stable=True)
        width = min(2 * beam_size, order.shape[1])  # >= beam_size non-EOS among them: <= K EOS
        summed, order = summed[:, :width], order[:, :width]
        valid = valid.gather(1, order)
        parent, token = order // vocab, order % vocab
        last_step = t + 1 == max_len
        ends = (token == eos) | last_step
        in_top = torch.arange(width, device=order.device)[None, :] < beam_size
        _record_finished(best, beams, parent, token, summed, valid & ends & in_top, t + 1,
                         length_penalty, eos)
        beams = _select_alive(beams, parent, token, summed, valid & ~ends)
        _stop_hopeless(beams, best, t + 1, max_len, length_penalty)
    return [row[:n].tolist() for row, n in zip(best.tokens.cpu(), best.lengths.cpu().tolist())]
