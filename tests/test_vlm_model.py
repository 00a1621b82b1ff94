"""VLM model (tiny): shapes, the sequence layout (position ids, token types, embedded slots),
padding invariance under every mask, what isolated / causal_text attention hides, the tied LM
head, flavour configs, and initialisation from the offline all-MiniLM-L6-v2 checkpoint."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.padding import fully_padded
from vidray.config import ConfigError
from vidray.config.vlm import ModelConfig
from vidray.data.vlm import collate
from vidray.models.vlm import (
    CLS_ID,
    FLAVOURS,
    SEP_ID,
    VLM,
    bert_config,
    build_vlm,
    pool,
    position_ids,
    sequence_slices,
    token_type_ids,
)
from vidray.models.vlm_masks import ATTENTION_MASKS, full_mask

LV, LT, VIDEO_DIM = 4, 6, 8
CFG = ModelConfig(flavour="tiny", video_dim=VIDEO_DIM, max_video_tokens=LV, max_seq_len=LV + LT + 2)


@pytest.fixture(scope="module")
def model() -> VLM:
    torch.manual_seed(0)
    return build_vlm(CFG).eval()


def make_batch(seed: int = 0) -> dict:
    """Two examples: one with padding on both sides, one full."""
    generator = torch.Generator().manual_seed(seed)
    video_mask = torch.tensor([[True, True, False, False], [True] * LV])
    text_mask = torch.tensor([[True, True, True, False, False, False], [True] * LT])
    text_ids = torch.randint(1000, 2000, (2, LT), generator=generator)
    text_ids[0, 2], text_ids[0, 3:] = SEP_ID, 0     # text, its final [SEP], then [PAD]
    text_ids[1, -1] = SEP_ID
    video = torch.randn(2, LV, VIDEO_DIM, generator=generator) * video_mask[..., None]
    return {"video": video, "video_mask": video_mask, "text_ids": text_ids, "text_mask": text_mask}


def run(model, batch, attention="full"):
    with torch.no_grad():
        return model(batch["video"], batch["video_mask"], batch["text_ids"], batch["text_mask"], attention)


def valid_rows(batch) -> torch.Tensor:
    one = torch.ones(2, 1, dtype=torch.bool)
    return torch.cat([one, batch["video_mask"], one, batch["text_mask"]], dim=1)


def test_shapes(model):
    batch = make_batch()
    hidden = run(model, batch)
    assert hidden.shape == (2, LV + LT + 2, 32)
    assert model.hidden_size == 32 and model.vocab_size == 30522
    assert model.lm_logits(hidden).shape == (2, LV + LT + 2, 30522)
    assert model.video_embeddings(batch["video"]).shape == (2, LV, 32)
    assert model.word_embeddings.shape == (30522, 32)
    video_vec, text_vec = pool(hidden, batch["video_mask"], batch["text_mask"], LV)
    assert video_vec.shape == text_vec.shape == (2, 32)
    assert not hasattr(model.bert, "pooler") or model.bert.pooler is None
    assert model.bert.config._attn_implementation == "sdpa"


def test_position_ids_and_token_types():
    # [CLS] v v v [SEP] t t t t
    assert position_ids(3, 4).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert token_type_ids(3, 4).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    # Video padded to fewer slots than max_video_tokens: text keeps its positions (REFERENCE.md).
    assert position_ids(2, 4, max_video_tokens=3).tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert sequence_slices(3, 4) == (slice(1, 4), slice(5, 9))
    assert VLM.slices(3, 4) == sequence_slices(3, 4)


def test_forward_builds_the_sequence_as_specified(model):
    """What reaches BERT's embedding module: [CLS]/[SEP] word vectors, video MLP output, text
    word vectors, and the position / token-type ids above."""
    seen = {}
    hook = model.bert.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    batch = make_batch()
    try:
        run(model, batch)
    finally:
        hook.remove()
    assert seen["position_ids"].tolist() == [position_ids(LV, LT).tolist()]
    assert seen["token_type_ids"].tolist() == [token_type_ids(LV, LT).tolist()]
    embeds, words = seen["inputs_embeds"], model.word_embeddings
    video_slots, text_slots = model.slices(LV, LT)
    with torch.no_grad():
        torch.testing.assert_close(embeds[:, 0], words[CLS_ID].expand(2, -1))
        torch.testing.assert_close(embeds[:, LV + 1], words[SEP_ID].expand(2, -1))
        torch.testing.assert_close(embeds[:, video_slots], model.video_embeddings(batch["video"]))
        torch.testing.assert_close(embeds[:, text_slots], words[batch["text_ids"]])


@pytest.mark.parametrize("attention", sorted(ATTENTION_MASKS))
def test_padded_slot_content_does_not_change_valid_outputs(model, attention):
    batch = make_batch()
    changed = {k: v.clone() for k, v in batch.items()}
    changed["video"][~batch["video_mask"]] = 5.0
    changed["text_ids"][~batch["text_mask"]] = 1234
    before, after = run(model, batch, attention), run(model, changed, attention)
    valid = valid_rows(batch)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after[valid], before[valid])


@pytest.mark.parametrize("attention", sorted(ATTENTION_MASKS))
def test_a_batch_padded_to_its_longest_computes_what_the_fully_padded_one_does(model, attention):
    """collate pads to the batch's longest video and text: every valid slot's state and both pooled
    vectors equal those of the same rows padded to the model's widths (the text keeps its positions)."""
    examples = {"video": [np.ones((1, VIDEO_DIM), np.float32), np.full((2, VIDEO_DIM), 0.5, np.float32)],
                "text_ids": [np.array([1500, 1600]), np.array([1700, 1800, 1900])]}
    short = collate(examples, max_video_tokens=LV, max_text_tokens=LT - 1, sep_id=SEP_ID)
    assert short["video"].shape[1] == 2 and short["text_ids"].shape[1] == 4      # not LV and LT
    full = fully_padded(short, LV, LT)
    lv = short["video"].shape[1]
    # Where each slot of the short layout sits in the full one: [CLS] and video, the first [SEP], text.
    slots = torch.cat([torch.arange(lv + 1), torch.tensor([LV + 1]), torch.arange(short["text_ids"].shape[1]) + LV + 2])
    hidden_short, hidden_full = run(model, short, attention), run(model, full, attention)
    valid = valid_rows(short)
    torch.testing.assert_close(hidden_short[valid], hidden_full[:, slots][valid], atol=1e-5, rtol=1e-5)
    for a, b in zip(pool(hidden_short, short["video_mask"], short["text_mask"]),
                    pool(hidden_full, full["video_mask"], full["text_mask"])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_isolated_sides_do_not_see_each_other(model):
    batch = make_batch()
    video_side = torch.arange(LV + LT + 2) <= LV + 1       # [CLS], video and the first [SEP]
    new_text = {**batch, "text_ids": batch["text_ids"].clone()}
    new_text["text_ids"][:, 0] += 7
    new_video = {**batch, "video": batch["video"] + batch["video_mask"][..., None]}
    base = run(model, batch, "isolated")
    torch.testing.assert_close(run(model, new_text, "isolated")[:, video_side], base[:, video_side])
    torch.testing.assert_close(run(model, new_video, "isolated")[:, ~video_side], base[:, ~video_side])
    # Not vacuous: with the full mask the video side does depend on the text.
    assert not torch.allclose(run(model, new_text, "full")[:, video_side], run(model, batch, "full")[:, video_side])


def test_isolated_equals_separate_video_only_and_text_only_passes(model):
    """The retrieval setup: one isolated pass = a video-only pass + a text-only pass."""
    batch = make_batch()
    both = run(model, batch, "isolated")
    no_text = {**batch, "text_mask": torch.zeros_like(batch["text_mask"])}
    no_video = {**batch, "video_mask": torch.zeros_like(batch["video_mask"])}
    video_slots, text_slots = model.slices(LV, LT)
    video_vec, _ = pool(run(model, no_text, "isolated"), batch["video_mask"], batch["text_mask"])
    _, text_vec = pool(run(model, no_video, "isolated"), batch["video_mask"], batch["text_mask"])
    expected_video, expected_text = pool(both, batch["video_mask"], batch["text_mask"])
    torch.testing.assert_close(video_vec, expected_video)
    torch.testing.assert_close(text_vec, expected_text)


def test_causal_text_slot_does_not_see_later_text(model):
    batch = make_batch()
    base = run(model, batch, "causal_text")
    j = 2                                   # change text slots > j in the full example
    changed = {**batch, "text_ids": batch["text_ids"].clone()}
    changed["text_ids"][1, j + 1:-1] += 11
    after = run(model, changed, "causal_text")
    upto = LV + 2 + j + 1                   # [CLS], video, [SEP] and text slots 0..j
    torch.testing.assert_close(after[1, :upto], base[1, :upto])
    assert not torch.allclose(after[1, upto:], base[1, upto:])
    torch.testing.assert_close(after[0], base[0])


def test_explicit_masks(model):
    batch = make_batch()
    length = LV + LT + 2
    full = run(model, batch, "full")
    valid = valid_rows(batch)
    explicit = full_mask(batch["video_mask"], batch["text_mask"])
    torch.testing.assert_close(run(model, batch, explicit)[valid], full[valid])
    # An [L, L] pattern gets key padding applied, so all-True means "full".
    everything = torch.ones(length, length, dtype=torch.bool)
    torch.testing.assert_close(run(model, batch, everything)[valid], full[valid])
    with pytest.raises(ValueError, match="unknown mask"):
        run(model, batch, "bidirectional")
    with pytest.raises(ValueError, match="explicit attention mask"):
        run(model, batch, torch.ones(length - 1, length - 1, dtype=torch.bool))


def test_lengths_beyond_the_config_are_refused(model):
    batch = make_batch()
    longer = {**batch, "text_ids": torch.cat([batch["text_ids"], batch["text_ids"]], 1),
              "text_mask": torch.cat([batch["text_mask"], batch["text_mask"]], 1)}
    with pytest.raises(ValueError, match="max_seq_len"):
        run(model, longer)


def test_lm_head_is_tied_to_word_embeddings(model):
    words = model.bert.embeddings.word_embeddings.weight
    assert model.word_embeddings is words
    vocab_sized = [name for name, p in model.named_parameters() if p.shape == words.shape]
    assert vocab_sized == ["bert.embeddings.word_embeddings.weight"]     # no separate decoder
    hidden = torch.randn(3, 32)
    expected = F.linear(model.head_transform(hidden), words, model.lm_bias)
    torch.testing.assert_close(model.lm_logits(hidden), expected)
    model.zero_grad()
    model.lm_logits(hidden)[:, 7].sum().backward()
    assert words.grad is not None and words.grad[7].abs().sum() > 0
    assert model.lm_bias.grad[7] == 3.0
    model.zero_grad()


def test_pool_is_a_masked_mean():
    hidden = torch.arange(2 * 9 * 1, dtype=torch.float32).reshape(2, 9, 1)
    video_mask = torch.tensor([[True, True, False], [False, False, False]])
    text_mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    video_vec, text_vec = pool(hidden, video_mask, text_mask, 3)
    # The video side includes its [SEP] (slot 4), as MMPT pools: slots 1, 2, 4; no valid slot -> [SEP] alone.
    assert video_vec[:, 0].tolist() == pytest.approx([7 / 3, 13.0])
    assert text_vec[:, 0].tolist() == [6.0, 15.5]          # slots 5, 7; slots 14..17


def test_flavour_configs():
    base = bert_config(ModelConfig(flavour="base"))
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.intermediate_size,
            base.vocab_size) == (768, 12, 12, 3072, 30522)
    small = bert_config(ModelConfig(flavour="small"))
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads,
            small.intermediate_size) == (384, 6, 12, 1536)
    assert set(FLAVOURS) == {"tiny", "small", "base"}
    with pytest.raises(ConfigError, match="model.flavour"):
        bert_config(ModelConfig(flavour="huge"))
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        bert_config(ModelConfig(max_seq_len=1000))


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_minilm_backbone_loads_offline(offline):
    from safetensors import safe_open

    from vidray.models.weights import resolve_text_model

    folder = resolve_text_model("minilm")
    # 'minilm' names the shipped files (what the demo's configs say); a folder works the same way
    model = build_vlm(ModelConfig(flavour="tiny", text_backbone="minilm")).eval()
    torch.testing.assert_close(model.word_embeddings, build_vlm(ModelConfig(text_backbone=folder)).word_embeddings)
    assert (model.hidden_size, len(model.bert.encoder.layer), model.vocab_size) == (384, 6, 30522)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        torch.testing.assert_close(model.word_embeddings.detach(), f.get_tensor("embeddings.word_embeddings.weight"))
        torch.testing.assert_close(model.bert.encoder.layer[5].output.dense.weight.detach(),
                                   f.get_tensor("encoder.layer.5.output.dense.weight"))
    batch = make_batch()
    batch["video"] = torch.randn(2, LV, 512)
    assert run(model, batch).shape == (2, LV + LT + 2, 384)


def test_unusable_backbone_is_a_config_error(offline, tmp_path):
    with pytest.raises(ConfigError, match="model.text_backbone.*config.json"):
        build_vlm(ModelConfig(text_backbone=str(tmp_path)))
    with pytest.raises(ConfigError, match="model.text_backbone"):
        build_vlm(ModelConfig(text_backbone="nobody/no-such-bert"))


def test_one_tokenizer_loader_caches_and_names_the_config_key(offline, tmp_path):
    from vidray.models.weights import text_tokenizer

    tok = text_tokenizer("minilm")
    assert text_tokenizer("minilm") is tok  # loaded once per process (every Ray Data batch asks)
    assert tok.convert_tokens_to_ids("[MASK]") == 103 and len(tok) == 30522
    with pytest.raises(ConfigError, match=r"text\.tokenizer.*cannot load tokenizer"):
        text_tokenizer(str(tmp_path), key="text.tokenizer")
