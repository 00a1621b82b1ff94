"""One rule for BERT-style token corruption (vidray.objectives.masking), shared by VLM and the frames models,
checked against the official rule: MMPT's TextMaskingProcessor and HuggingFace's
DataCollatorForLanguageModeling (All-in-one's collator) both draw random replacements with
``torch.randint(len(tokenizer), shape)``: the whole vocabulary, special tokens included."""

from __future__ import annotations

import torch
from torch.testing import assert_close

import vidray.train.frames_system as frames_system
import vidray.objectives.masking as masking
import vidray.objectives.vlm as vlm_objectives
from vidray.config.vlm import ObjectiveConfig
from vidray.objectives.masking import mask_text
from vidray.objectives.vlm import IGNORE_INDEX, SpecialIds, mask_batch

PAD, CLS, SEP, MASK, VOCAB = 0, 1, 2, 3, 6


def test_random_token_ids_are_the_official_whole_vocabulary_draw():
    shape = (7, 50)
    ours = masking.random_token_ids(shape, 30522, torch.Generator().manual_seed(11))
    # The official call, on the same generator state.
    official = torch.randint(30522, shape, dtype=torch.long, generator=torch.Generator().manual_seed(11))
    assert torch.equal(ours, official)

    counts = torch.bincount(masking.random_token_ids((60000,), VOCAB, torch.Generator().manual_seed(0)),
                            minlength=VOCAB).float() / 60000
    assert_close(counts, torch.full((VOCAB,), 1 / VOCAB), atol=0.01, rtol=0)   # specials included


def test_corrupt_equals_a_token_by_token_transcription():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 30, (6, 40), generator=g)
    chosen = torch.rand(ids.shape, generator=g) < 0.5
    roll = torch.rand(ids.shape, generator=g)
    random_ids = torch.randint(30, ids.shape, generator=g)
    expected = ids.clone()
    for i, j in zip(*torch.nonzero(chosen, as_tuple=True)):
        u = float(roll[i, j])
        if u < 0.8:                        # bernoulli(0.8): [MASK]
            expected[i, j] = MASK
        elif (u - 0.8) / 0.2 < 0.5:        # bernoulli(0.5) of the rest: a random id
            expected[i, j] = random_ids[i, j]
    assert torch.equal(masking.corrupt(ids, chosen, roll, random_ids, MASK), expected)


def test_vlm_and_frames_masking_use_the_one_rule():
    assert vlm_objectives.random_token_ids is masking.random_token_ids
    assert vlm_objectives.corrupt is masking.corrupt
    assert frames_system.mask_text is masking.mask_text  # the frames models' masking is the module's own


def replaced_by_special(inputs: torch.Tensor, original: torch.Tensor, targets: torch.Tensor) -> set[int]:
    """Special ids other than [MASK] that now sit where a predicted word was: random replacements."""
    picked = targets != IGNORE_INDEX
    return set(inputs[picked & (inputs != original)].tolist()) & {PAD, CLS, SEP}


def test_both_paths_draw_special_ids_as_random_replacements():
    """In a 6-token vocabulary, [CLS], [SEP] and [PAD] are half of the random draws: both paths must
    produce them (VLM used to draw from the vocabulary minus the special ids)."""
    g = torch.Generator().manual_seed(0)
    words = torch.randint(4, VOCAB, (200, 30), generator=g)
    mask = torch.ones_like(words, dtype=torch.bool)

    inputs, targets = mask_text(words, mask, 0.5, MASK, VOCAB, torch.Generator().manual_seed(1), (PAD, CLS, SEP, MASK))
    assert replaced_by_special(inputs, words, targets) == {PAD, CLS, SEP}

    special = SpecialIds(pad=PAD, cls=CLS, sep=SEP, mask=MASK, vocab_size=VOCAB)
    batch = {"video": torch.zeros(200, 2, 1), "video_mask": torch.ones(200, 2, dtype=torch.bool),
             "text_ids": words, "text_mask": mask}
    m = mask_batch(batch, ObjectiveConfig(mmm_ratio=0.0, mlm_prob=0.5), special, torch.Generator().manual_seed(1))
    assert replaced_by_special(m.text_ids, words, m.text_targets) == {PAD, CLS, SEP}
