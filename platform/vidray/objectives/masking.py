"""BERT's token corruption, one rule for every model that masks text (VLM, All-in-one, LAVENDER,
E-ViLM): a token chosen for prediction becomes [MASK] 80% of the time, a random token 10% of the
time, and stays as it was 10% of the time.

Random replacements are drawn uniformly from the WHOLE vocabulary, special tokens ([CLS], [SEP],
[PAD], [MASK], ...) included, as both official codes do: MMPT's ``TextMaskingProcessor`` (fairseq
``examples/MMPT/mmpt/processors/how2processor.py``) and HuggingFace's
``DataCollatorForLanguageModeling`` (All-in-one's MLM collator, ViLT's too) call
``torch.randint(len(tokenizer), shape)``. Which tokens may be *chosen* is each caller's business;
:func:`mask_text` is the frames models' choice (real tokens, not special ones).

    roll = torch.rand(ids.shape, generator=g)
    inputs = corrupt(ids, chosen, roll, random_token_ids(ids.shape, vocab, g), mask_id)
"""

from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100
"""The target of a position with nothing to predict (PyTorch's cross-entropy default)."""

MASK_BELOW, RANDOM_BELOW = 0.8, 0.9
"""A chosen token whose roll is below 0.8 becomes [MASK] (80%), below 0.9 a random id (10%); the
remaining 10% are kept."""


def uniform(shape, generator: Optional[torch.Generator] = None,
            device: torch.device | str | None = None) -> torch.Tensor:
    """float ``shape`` uniform on [0, 1), drawn where :func:`random_token_ids` draws."""
    where = generator.device if generator is not None else device
    values = torch.rand(tuple(shape), generator=generator, device=where)
    return values if device is None else values.to(device)


def random_token_ids(shape, vocab_size: int, generator: Optional[torch.Generator] = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """long ``shape``: ids uniform over ``[0, vocab_size)``, special tokens included.

    Drawn on the generator's device (a CPU generator can drive a GPU batch reproducibly), then
    moved to ``device`` (default: where they were drawn)."""
    where = generator.device if generator is not None else device
    ids = torch.randint(vocab_size, tuple(shape), generator=generator, device=where)
    return ids if device is None else ids.to(device)


def corrupt(ids: torch.Tensor, chosen: torch.Tensor, roll: torch.Tensor, random_ids: torch.Tensor,
            mask_id: int) -> torch.Tensor:
    """A copy of ``ids`` where each ``chosen`` token is replaced by ``mask_id`` if its ``roll``
    (uniform in [0, 1)) is below 0.8, by its ``random_ids`` entry if the roll is in [0.8, 0.9),
    and kept otherwise. A roll of 0 everywhere gives "always [MASK]" (LAVENDER's MLM)."""
    to_mask = chosen & (roll < MASK_BELOW)
    to_random = chosen & (roll >= MASK_BELOW) & (roll < RANDOM_BELOW)
    out = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    return torch.where(to_random, random_ids.to(ids.device), out)


def mask_text(text_ids: torch.Tensor, text_mask: torch.Tensor, prob: float, mask_id: int, vocab: int,
              generator: torch.Generator, special: tuple[int, ...],
              always_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``prob`` of the real tokens chosen; of those 80% [MASK], 10% random (from the
    whole vocabulary, the rule above, shared with VLM), 10% kept (``always_mask``:
    all [MASK], LAVENDER's). Returns (inputs, targets with IGNORE_INDEX where nothing is predicted)."""
    candidates = text_mask & ~torch.isin(text_ids, torch.tensor(special))
    chosen = candidates & (torch.rand(text_ids.shape, generator=generator) < prob)
    targets = text_ids.masked_fill(~chosen, IGNORE_INDEX)
    roll = torch.rand(text_ids.shape, generator=generator)
    if always_mask:
        roll.zero_()
    random_ids = random_token_ids(text_ids.shape, vocab, generator, text_ids.device)
    return corrupt(text_ids, chosen, roll, random_ids, mask_id), targets
