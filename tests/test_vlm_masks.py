"""VLM attention masks: cell by cell against hand-written matrices, and against a naive per-cell
reference on random paddings; key padding, no empty rows, the registry."""

from __future__ import annotations

import pytest
import torch

from vidray.models.vlm_masks import (
    ATTENTION_MASKS,
    causal_text_mask,
    full_mask,
    isolated_mask,
    restrict_to_valid,
    valid_slots,
)

# Lv = 3 (2 valid), Lt = 4 (3 valid: two words and the final [SEP]). Slots:
#   0 CLS | 1 v1 | 2 v2 | 3 v-pad | 4 SEP | 5 t1 | 6 t2 | 7 SEP | 8 t-pad
VIDEO_MASK = torch.tensor([[True, True, False]])
TEXT_MASK = torch.tensor([[True, True, True, False]])

EXPECTED = {
    "full": """
        111011110
        111011110
        111011110
        000100000
        111011110
        111011110
        111011110
        111011110
        000000001""",
    "isolated": """
        100000000
        011010000
        011010000
        000100000
        011010000
        000001110
        000001110
        000001110
        000000001""",
    "causal_text": """
        111010000
        111010000
        111010000
        000100000
        111010000
        111011000
        111011100
        111011110
        000000001""",
}


def parse(rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row.strip()] for row in rows.strip().splitlines()])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mask_matches_hand_written_matrix(name):
    mask = ATTENTION_MASKS[name](VIDEO_MASK, TEXT_MASK)
    assert mask.dtype == torch.bool and mask.shape == (1, 9, 9)
    expected = parse(EXPECTED[name])
    for q in range(9):
        for k in range(9):
            assert mask[0, q, k] == expected[q, k], f"{name}: query slot {q}, key slot {k}"


def naive_mask(name: str, video_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """One example, one cell at a time, straight from the rules in the module docstring."""
    lv, lt = len(video_mask), len(text_mask)
    length = lv + lt + 2

    def kind(i):
        return "cls" if i == 0 else "video" if i <= lv + 1 else "text"

    def valid(i):
        if i == 0 or i == lv + 1:
            return True
        return bool(video_mask[i - 1]) if i <= lv else bool(text_mask[i - lv - 2])

    out = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for k in range(length):
            if not (valid(q) and valid(k)):
                out[q, k] = q == k
            elif name == "full":
                out[q, k] = True
            elif name == "isolated":
                out[q, k] = q == k if kind(q) == "cls" else kind(q) == kind(k)
            else:  # causal_text
                out[q, k] = kind(k) != "text" or (kind(q) == "text" and k <= q)
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mask_matches_naive_reference_on_random_padding(name):
    generator = torch.Generator().manual_seed(0)
    video_mask = torch.rand(5, 4, generator=generator) < 0.6
    text_mask = torch.rand(5, 5, generator=generator) < 0.6
    video_mask[0] = text_mask[0] = True      # nothing padded
    video_mask[1] = text_mask[2] = False     # a whole side padded
    mask = ATTENTION_MASKS[name](video_mask, text_mask)
    for b in range(5):
        assert torch.equal(mask[b], naive_mask(name, video_mask[b], text_mask[b])), f"{name}, example {b}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_padded_slots_are_never_attended_and_no_row_is_empty(name):
    video_mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    text_mask = torch.tensor([[True, True, False], [True, False, False]])
    mask = ATTENTION_MASKS[name](video_mask, text_mask)
    valid = valid_slots(video_mask, text_mask)
    off_diagonal = ~torch.eye(mask.shape[-1], dtype=torch.bool)
    assert not (mask & ~valid[:, None, :] & off_diagonal).any()
    assert mask.any(dim=-1).all()            # SDPA would return NaN for an empty row


def test_valid_slots_layout():
    assert valid_slots(VIDEO_MASK, TEXT_MASK).tolist() == [[True, True, True, False, True, True, True, True, False]]


def test_restrict_to_valid_applies_key_padding_to_an_explicit_pattern():
    valid = valid_slots(VIDEO_MASK, TEXT_MASK)
    nothing = torch.zeros(9, 9, dtype=torch.bool)
    assert torch.equal(restrict_to_valid(nothing, valid)[0], torch.eye(9, dtype=torch.bool))
    everything = torch.ones(9, 9, dtype=torch.bool)
    assert torch.equal(restrict_to_valid(everything, valid), full_mask(VIDEO_MASK, TEXT_MASK))


def test_registry_is_complete():
    assert ATTENTION_MASKS == {"full": full_mask, "isolated": isolated_mask, "causal_text": causal_text_mask}
