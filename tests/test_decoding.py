"""Greedy and beam-search decoding against toy step functions with known answers.

The toy model is a fixed random table of log-probs indexed by (batch row, last token, position),
so every sequence's exact score can be computed by brute force and compared with the decoders.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vidray.models.decoding import beam_search, greedy_decode

BOS, EOS = 0, 1


def random_table(batch_size: int, vocab: int, max_len: int, seed: int) -> torch.Tensor:
    """log-probs [batch, last token, position, next token], normalized over the next token."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, vocab, max_len, vocab, generator=generator)
    return torch.log_softmax(logits, dim=-1)


def table_step(table: torch.Tensor, row_offset: int = 0):
    """A StepFn reading `table`; `row_offset` maps local rows to table rows (for solo decodes)."""

    def step(prefixes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        assert prefixes.dtype == torch.long and rows.dtype == torch.long
        assert bool((prefixes[:, 0] == BOS).all()), "every prefix starts with BOS"
        position = prefixes.shape[1] - 1
        return table[rows + row_offset, prefixes[:, -1], position]

    return step


def sequence_score(table: torch.Tensor, row: int, seq: tuple[int, ...], length_penalty: float) -> float:
    """Exact score of a complete sequence (EOS included if it ends with one), in float64."""
    total, last = 0.0, BOS
    for position, token in enumerate(seq):
        total += float(table[row, last, position, token])
        last = token
    return total / len(seq) ** length_penalty


def complete_sequences(vocab: int, max_len: int) -> list[tuple[int, ...]]:
    """Every sequence a decoder can finish with: k < max_len non-EOS tokens then EOS, or
    max_len non-EOS tokens."""
    words = [token for token in range(vocab) if token != EOS]
    ended = [prefix + (EOS,) for k in range(max_len) for prefix in itertools.product(words, repeat=k)]
    return ended + list(itertools.product(words, repeat=max_len))


def brute_force(table: torch.Tensor, row: int, max_len: int, length_penalty: float) -> list[int]:
    """Best complete sequence by enumeration, EOS stripped."""
    vocab = table.shape[-1]
    best = max(complete_sequences(vocab, max_len), key=lambda seq: sequence_score(table, row, seq, length_penalty))
    return [token for token in best if token != EOS]


@pytest.mark.parametrize("seed", range(5))
def test_beam_size_one_equals_greedy(seed):
    table = random_table(batch_size=4, vocab=5, max_len=4, seed=seed)
    step = table_step(table)
    greedy = greedy_decode(step, batch_size=4, bos=BOS, eos=EOS, max_len=4)
    assert beam_search(step, batch_size=4, bos=BOS, eos=EOS, max_len=4, beam_size=1) == greedy


EXHAUSTIVE = {"batch_size": 3, "vocab": 5, "max_len": 4}


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_full_beam_equals_exhaustive_search(seed, length_penalty):
    batch_size, vocab, max_len = EXHAUSTIVE.values()
    table = random_table(batch_size, vocab, max_len, seed=100 + seed)
    beam_size = len(complete_sequences(vocab, max_len))  # 341: no candidate is ever pruned
    decoded = beam_search(table_step(table), batch_size, BOS, EOS, max_len, beam_size, length_penalty)
    for row in range(batch_size):
        assert decoded[row] == brute_force(table, row, max_len, length_penalty), row


def test_exhaustive_cases_are_not_trivial():
    # The tables above must be hard enough that pruning matters, or the test proves nothing.
    batch_size, vocab, max_len = EXHAUSTIVE.values()
    wrong = {1: 0, 2: 0}
    for seed, length_penalty in itertools.product(range(4), [0.0, 1.0, 2.0]):
        table = random_table(batch_size, vocab, max_len, seed=100 + seed)
        best = [brute_force(table, row, max_len, length_penalty) for row in range(batch_size)]
        for beam_size in wrong:
            decoded = beam_search(table_step(table), batch_size, BOS, EOS, max_len, beam_size, length_penalty)
            wrong[beam_size] += sum(got != want for got, want in zip(decoded, best))
    assert wrong[1] > 0 and wrong[2] > 0, wrong


def two_path_step(prefixes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Greedy's trap: token 2 is likelier first, but token 3 is almost surely followed by EOS.

    Tokens: 0 = BOS, 1 = EOS, 2 = "a", 3 = "b".
    Greedy: a (0.553) then EOS (0.34) -> 0.188.  Best: b (0.445) then EOS (0.99) -> 0.441.
    """
    first = torch.tensor([0.001, 0.001, 0.553, 0.445])
    after_a = torch.tensor([0.001, 0.34, 0.33, 0.329])
    after_b = torch.tensor([0.001, 0.99, 0.005, 0.004])
    uniform = torch.full((4,), 0.25)
    out = []
    for prefix in prefixes:
        if len(prefix) == 1:
            out.append(first)
        else:
            out.append({2: after_a, 3: after_b}.get(int(prefix[-1]), uniform))
    return torch.log(torch.stack(out))


def test_beam_finds_what_greedy_misses():
    assert greedy_decode(two_path_step, 1, BOS, EOS, max_len=3) == [[2]]
    assert beam_search(two_path_step, 1, BOS, EOS, max_len=3, beam_size=2) == [[3]]
    assert beam_search(two_path_step, 1, BOS, EOS, max_len=3, beam_size=1) == [[2]]


def constant_step(probs: list[float]):
    """A StepFn that always predicts the same distribution."""
    log_probs = torch.log(torch.tensor(probs))

    def step(prefixes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return log_probs.expand(prefixes.shape[0], -1).clone()

    return step


def test_eos_first_gives_empty_caption():
    step = constant_step([0.05, 0.8, 0.1, 0.05])
    assert greedy_decode(step, 2, BOS, EOS, max_len=4) == [[], []]
    assert beam_search(step, 2, BOS, EOS, max_len=4, beam_size=3) == [[], []]


def test_without_eos_decoding_stops_at_max_len():
    step = constant_step([0.1, 0.0, 0.6, 0.3])  # EOS has probability 0 (log-prob -inf)
    assert greedy_decode(step, 1, BOS, EOS, max_len=3) == [[2, 2, 2]]
    assert beam_search(step, 1, BOS, EOS, max_len=3, beam_size=4, length_penalty=1.0) == [[2, 2, 2]]


def test_eos_never_appears_in_outputs_and_ends_each_row_separately():
    table = random_table(batch_size=6, vocab=4, max_len=5, seed=7)
    for decoded in (
        greedy_decode(table_step(table), 6, BOS, EOS, 5),
        beam_search(table_step(table), 6, BOS, EOS, 5, beam_size=3, length_penalty=0.5),
    ):
        assert all(EOS not in tokens and len(tokens) <= 5 for tokens in decoded)


def test_greedy_stops_asking_for_finished_rows():
    # Row 0 ends at once (EOS first), row 1 never ends: later calls must only carry row 1.
    def step(prefixes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        calls.append(rows.tolist())
        probs = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.1, 0.0, 0.1, 0.8]])
        return torch.log(probs[rows])

    calls: list[list[int]] = []
    assert greedy_decode(step, 2, BOS, EOS, max_len=3) == [[], [3, 3, 3]]
    assert calls == [[0, 1], [1], [1]]


def test_beam_search_stops_once_no_live_hypothesis_can_win():
    # EOS first is best by far (log 0.9); with penalty 0 no extension can catch up, so one call.
    calls: list[int] = []

    def step(prefixes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        calls.append(prefixes.shape[1])
        return constant_step([0.02, 0.9, 0.05, 0.03])(prefixes, rows)

    assert beam_search(step, 1, BOS, EOS, max_len=10, beam_size=3) == [[]]
    assert calls == [1]


@pytest.mark.parametrize("decoder", ["greedy", "beam"])
def test_batch_rows_are_decoded_independently(decoder):
    batch_size, vocab, max_len = 5, 5, 4
    table = random_table(batch_size, vocab, max_len, seed=11)

    def run(step, n):
        if decoder == "greedy":
            return greedy_decode(step, n, BOS, EOS, max_len)
        return beam_search(step, n, BOS, EOS, max_len, beam_size=3, length_penalty=1.0)

    together = run(table_step(table), batch_size)
    alone = [run(table_step(table, row_offset=row), 1)[0] for row in range(batch_size)]
    assert together == alone


def test_zero_max_len_and_empty_batch_need_no_model_calls():
    def step(prefixes, rows):
        raise AssertionError("step_fn must not be called")

    assert greedy_decode(step, 3, BOS, EOS, max_len=0) == [[], [], []]
    assert beam_search(step, 3, BOS, EOS, max_len=0) == [[], [], []]
    assert greedy_decode(step, 0, BOS, EOS, max_len=4) == []
    assert beam_search(step, 0, BOS, EOS, max_len=4) == []


def test_invalid_arguments_and_bad_step_output_raise():
    step = constant_step([0.25, 0.25, 0.25, 0.25])
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(step, 1, BOS, EOS, max_len=3, beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(step, 1, BOS, EOS, max_len=-1)
    with pytest.raises(ValueError, match="eos"):
        greedy_decode(step, 1, BOS, eos=7, max_len=3)
    with pytest.raises(ValueError, match="shape"):
        beam_search(lambda prefixes, rows: torch.zeros(4), 1, BOS, EOS, max_len=3)


def test_hand_computed_scores_with_length_penalty():
    # Constant distribution: EOS 0.5, token 2 0.3, token 3 0.2. With penalty 0 stopping at once
    # wins (log 0.5 = -0.693). With penalty 2 longer is better: "2 2 EOS" scores
    # (2 log 0.3 + log 0.5) / 3**2 = -0.345, above "2 2 2" (3 log 0.3 / 9 = -0.401, no EOS at
    # max_len), "2 EOS" (log 0.15 / 4 = -0.474) and "EOS" (-0.693).
    step = constant_step([1e-9, 0.5, 0.3, 0.2 - 1e-9])
    assert beam_search(step, 1, BOS, EOS, max_len=3, beam_size=4, length_penalty=0.0) == [[]]
    two_two_eos = (2 * math.log(0.3) + math.log(0.5)) / 9
    assert two_two_eos > 3 * math.log(0.3) / 9 > math.log(0.15) / 4 > math.log(0.5)
    assert beam_search(step, 1, BOS, EOS, max_len=3, beam_size=4, length_penalty=2.0) == [[2, 2]]


def test_early_stop_accounts_for_length_penalty_growth():
    # EOS first scores log 0.7 = -0.357. The live "2" (sum log 0.3 = -1.204) looks hopeless if
    # only its next length is considered (-1.204 / 2 = -0.602), but "2" is then followed by "2"
    # almost surely, and at max_len 6 it scores about -1.204 / 6 = -0.201: it must win.
    def step(prefixes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        first = torch.tensor([1e-6, 0.7, 0.3 - 1e-6])
        after_2 = torch.tensor([1e-6, 1e-6, 1.0 - 2e-6])
        return torch.log(torch.stack([first if len(p) == 1 else after_2 for p in prefixes]))

    assert beam_search(step, 1, BOS, EOS, max_len=6, beam_size=2, length_penalty=0.0) == [[]]
    assert beam_search(step, 1, BOS, EOS, max_len=6, beam_size=2, length_penalty=1.0) == [[2] * 6]
