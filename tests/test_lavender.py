"""LAVENDER: everything as MLM through one head; the [MASK]-slot plumbing against naive references."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from vidray.config import ConfigError, from_dict
from vidray.config.frames import (FINETUNE_TASKS, FramesDataConfig, FramesFinetuneConfig, FramesModelConfig,
                                  FramesObjectiveConfig, FramesPretrainConfig)
from vidray.data.frames import IGNORE_INDEX, clip_examples
from vidray.eval.frames import MatchingScorer, TowerScorer, evaluate_mc
from vidray.models.build import build_net, size_figures
from vidray.models.lavender import LAVENDER_FLAVOURS, Lavender
from vidray.objectives.lavender import (LavenderRetrievalModel, Words, append_mask_slot, insert_mask_slot,
                                        matching_batch, pair_scores, sampled_pairs, true_score)
from vidray.objectives.masking import mask_text
from vidray.train.frames_run import run_frames_finetune
from vidray.train.lavender_system import LavenderFinetuneSystem, LavenderPretrainSystem

CLS, SEP, MASK, PAD = 101, 102, 103, 0
MODEL_24 = FramesModelConfig(arch="lavender", flavour="tiny", image_size=64, num_frames=3, max_text_tokens=24)


def tiny(frames: int = 3) -> Lavender:
    torch.manual_seed(0)
    return Lavender(LAVENDER_FLAVOURS["tiny"], vocab_size=30522, image_size=64, num_frames=frames,
                    max_text_tokens=16).eval()


def test_mlm_logits_for_every_text_slot_and_the_head_is_tied_to_the_word_embeddings():
    model = tiny()
    frames, ids = torch.randn(2, 3, 3, 64, 64), torch.randint(1000, 2000, (2, 7))
    logits = model(frames, ids, torch.ones(2, 7, dtype=torch.bool))
    assert logits.shape == (2, 7, 30522)
    assert model.mlm.predictions.decoder.weight is model.embeddings.word_embeddings.weight
    # 64 px, 16-px patches: 4 x 4 tokens per frame, plus the frame's mean token.
    assert model.video_tokens(frames).shape == (2, 3 * (1 + 16), 64)
    # The text sees the video: other frames, other logits.
    assert not torch.allclose(logits, model(torch.randn(2, 3, 3, 64, 64), ids, torch.ones(2, 7, dtype=torch.bool)))


def test_padding_after_the_text_changes_nothing():
    model = tiny()
    frames, ids = torch.randn(1, 3, 3, 64, 64), torch.randint(1000, 2000, (1, 5))
    with torch.no_grad():
        out = model(frames, ids, torch.ones(1, 5, dtype=torch.bool))
        padded = model(frames, torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
                       torch.tensor([[True] * 5 + [False] * 3]))
    torch.testing.assert_close(padded[:, :5], out, rtol=1e-4, atol=1e-4)


# --- the official rules (microsoft/LAVENDER), transcribed ---------------------------------------------

def official_text(ids: list[int], size_txt: int) -> tuple[list[int], list[bool]]:
    """dataset.py: ``str2txt`` pads to ``size_txt`` (mask 1 where not [PAD]), then
    ``append_mask_tok2txt`` adds [MASK] with mask 1: the matching [MASK] at position size_txt."""
    txt = list(ids) + [PAD] * (size_txt - len(ids))
    return txt + [MASK], [t != PAD for t in txt] + [True]


def official_slot_logits(net, frames: torch.Tensor, texts: list[list[int]], size_txt: int) -> torch.Tensor:
    """The vocabulary at the appended [MASK] of each (clip, text) pair, one plain forward per pair
    (default position ids 0 .. size_txt): ``[pairs, V]``."""
    rows = []
    for clip, ids in zip(frames, texts):
        txt, mask = official_text(ids, size_txt)
        with torch.no_grad():
            rows.append(net(clip[None], torch.tensor([txt]), torch.tensor([mask]))[0, size_txt])
    return torch.stack(rows)


def batch_of(words: Words, captions: list[str], frames: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"frames": rng.integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8),
             "text_ids": np.asarray(words.tokenizer(c)["input_ids"])} for c in captions]


CAPTIONS = ["a red square moves left", "a blue circle rises", "green star", "a yellow triangle moves down slowly"]


def test_matching_mask_is_appended_after_the_padding_at_position_size_txt():
    """Item: the official [MASK] sits after the padding, at position size_txt. Ours sits right after
    the batch's padding with position id size_txt: the same [MASK] state as the official layout."""
    net = tiny()
    ids = torch.tensor([[CLS, 1200, 1300, SEP], [CLS, 1400, SEP, PAD]])
    out, out_mask, positions, slots = append_mask_slot(ids, ids != PAD, 10, MASK)
    assert out.tolist() == [[CLS, 1200, 1300, SEP, MASK], [CLS, 1400, SEP, PAD, MASK]]
    assert out_mask.tolist() == [[True] * 5, [True, True, True, False, True]]
    assert positions.tolist() == [[0, 1, 2, 3, 10]] * 2 and slots.tolist() == [4, 4]
    frames = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        ours = net(frames, out, out_mask, slots=slots, positions=positions)
    texts = [[CLS, 1200, 1300, SEP], [CLS, 1400, SEP]]
    torch.testing.assert_close(ours, official_slot_logits(net, frames, texts, 10), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="exceed size_txt"):
        append_mask_slot(ids, ids != PAD, 3, MASK)


def test_retrieval_finetuning_loss_is_the_official_all_pairs_loss():
    """main_retrieval_mlm.py: every clip i with every text j of the batch, target "true" when they
    are the same (video), "false" otherwise; cross-entropy over the vocabulary at the appended
    [MASK], averaged over the B x B pairs. The old rule (1 + 3 per text, the [MASK] before [SEP])
    gives another loss."""
    cfg = finetune_cfg("retrieval")
    assert cfg.match_negatives is None  # the official rule is the default
    torch.manual_seed(0)
    system = LavenderFinetuneSystem(cfg, torch.device("cpu"))
    net = system.model.net.eval()
    words = Words("minilm")
    batch = system.collate(batch_of(words, CAPTIONS))
    loss, _ = system.training_step(batch)
    texts = [words.tokenizer(c)["input_ids"] for c in CAPTIONS]
    n = len(CAPTIONS)
    pairs = [(i, j) for i in range(n) for j in range(n)]
    logits = official_slot_logits(net, batch["frames"][[i for i, _ in pairs]], [texts[j] for _, j in pairs],
                                  cfg.model.max_text_tokens)
    targets = torch.tensor([words.true if i == j else words.false for i, j in pairs])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets), rtol=1e-4, atol=1e-5)


def test_all_pairs_are_clip_major_with_true_on_the_diagonal():
    words = Words("minilm")
    frames = torch.arange(3, dtype=torch.float).view(3, 1, 1, 1, 1).expand(3, 1, 3, 2, 2)
    ids = torch.tensor([[CLS, 10 + i, SEP] for i in range(3)])
    _, pair_ids, _, _, _, clips, texts, targets = matching_batch(frames, ids, torch.ones_like(ids, dtype=torch.bool),
                                                                 words, size_txt=8)
    expected = [(i, j) for i in range(3) for j in range(3)]  # the official double loop
    assert list(zip(clips.tolist(), texts.tolist())) == expected
    assert targets.tolist() == [words.true if i == j else words.false for i, j in expected]
    assert pair_ids[:, 1].tolist() == [10, 11, 12]
    assert words.true != words.false and words.tokenizer.convert_ids_to_tokens([words.true]) == ["true"]


def test_sampled_pairs_give_each_clip_its_text_then_distinct_random_other_texts():
    """main_pretrain_mlm.py: for clip i, its own text, then the first min(B, 4) - 1 of a random
    permutation of the other rows: distinct, never i, every other row equally likely."""
    n, k = 5, 3
    counts = torch.zeros(n, n)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        clips, texts = sampled_pairs(n, k, generator)
        assert clips.tolist() == [i for i in range(n) for _ in range(k + 1)]
        per_clip = texts.view(n, k + 1)
        assert per_clip[:, 0].tolist() == list(range(n))
        for i, row in enumerate(per_clip[:, 1:].tolist()):
            assert len(set(row)) == k and i not in row
            counts[i, row] += 1
    off = counts[~torch.eye(n, dtype=torch.bool)]
    # Each other row is drawn with probability k / (n - 1) = 0.75: 1500 of 2000, binomial sd ~19.
    assert off.min() > 1400 and off.max() < 1600
    clips, texts = sampled_pairs(3, 3, generator)  # at most the n - 1 other rows
    assert len(clips) == 3 * 3 and sorted(texts.view(3, 3)[0, 1:].tolist()) == [1, 2]


def test_pretraining_loss_is_the_official_mlm_plus_matching_on_masked_text():
    """main_pretrain_mlm.py: MLM on the masked texts (each with the matching [MASK] appended,
    predicting nothing there) + matching where each clip meets its own masked text ("true") and 3
    other rows' masked texts ("false"). With 4 rows the 3 others are all the others, so the draw
    cannot change the loss. The old rule (clean text, the clip's 3 neighbouring clips, the [MASK]
    before [SEP]) gives another loss."""
    cfg = FramesPretrainConfig(model=FramesModelConfig(arch="lavender", flavour="tiny", image_size=64, num_frames=3,
                                                       max_text_tokens=12),
                               objective=FramesObjectiveConfig(mlm_prob=0.5, vtm_negatives=3))
    torch.manual_seed(0)
    system = LavenderPretrainSystem(cfg, torch.device("cpu"))
    net, words = system.model.net.eval(), system.words
    batch = system.collate(batch_of(words, CAPTIONS))
    loss, logs = system.training_step(batch)
    # The run's masking: mask_text's draws come first from the run's seeded generator.
    masked, targets = mask_text(batch["text_ids"], batch["text_mask"], 0.5, words.mask, words.vocab,
                                torch.Generator().manual_seed(cfg.train.seed), words.special, always_mask=True)
    assert (targets != IGNORE_INDEX).any()
    size, n = cfg.model.max_text_tokens, len(CAPTIONS)
    texts = [row[m].tolist() for row, m in zip(masked, batch["text_mask"])]
    mlm_logits, mlm_targets = [], []
    for b in range(n):
        txt, mask = official_text(texts[b], size)
        with torch.no_grad():
            mlm_logits.append(net(batch["frames"][b:b + 1], torch.tensor([txt]), torch.tensor([mask]))[0])
        answer = targets[b][batch["text_mask"][b]].tolist()
        mlm_targets.append(torch.tensor(answer + [IGNORE_INDEX] * (size + 1 - len(answer))))
    mlm = torch.nn.functional.cross_entropy(torch.cat(mlm_logits), torch.cat(mlm_targets), ignore_index=IGNORE_INDEX)
    pairs = [(i, j) for i in range(n) for j in [i] + [j for j in range(n) if j != i]]
    vtm_logits = official_slot_logits(net, batch["frames"][[i for i, _ in pairs]], [texts[j] for _, j in pairs], size)
    vtm = torch.nn.functional.cross_entropy(vtm_logits, torch.tensor([words.true if i == j else words.false
                                                                      for i, j in pairs]))
    assert logs["mlm_loss"] == pytest.approx(mlm.item(), rel=1e-4)
    assert logs["vtm_loss"] == pytest.approx(vtm.item(), rel=1e-4)
    torch.testing.assert_close(loss, mlm + vtm, rtol=1e-4, atol=1e-5)


def test_probability_ratio_ranks_where_the_official_raw_logit_ratio_does_not():
    """The official eval scores l_true / (l_true + l_false) on raw logits. Pair A is undecided
    (l_true = l_false = 1); pair B leans "true" by 2 (l_true = -1, l_false = -3): the raw ratio
    ranks A (0.5) above B (0.25); p(true) / (p(true) + p(false)) ranks B (0.88) above A (0.5). A
    shift of every logit (the MLM head's bias) moves the raw ratio, not the probability ratio."""
    words = Words("minilm")
    logits = torch.zeros(2, 30522)
    logits[0, [words.true, words.false]] = torch.tensor([1.0, 1.0])
    logits[1, [words.true, words.false]] = torch.tensor([-1.0, -3.0])
    l_true, l_false = logits[:, words.true], logits[:, words.false]
    # The official ratio l_true / (l_true + l_false) gives A 0.5 and B 0.25: B ranked below A.
    ours = true_score(logits, words.true, words.false)
    torch.testing.assert_close(ours, torch.sigmoid(l_true - l_false))
    assert ours[1] > ours[0] and ours[0] == 0.5
    # Shifting every logit by 4 moves the official ratio (A 5/10, B 3/8), not this score.
    torch.testing.assert_close(true_score(logits + 4.0, words.true, words.false), ours)


def test_mask_slot_goes_before_the_final_sep_of_each_row():
    """Open-ended QA's "answer: [MASK]" (official main_qaoe_mlm.py writes it inside the text)."""
    ids = torch.tensor([[CLS, 7, 8, SEP, PAD], [CLS, 9, 10, 11, SEP]])
    mask = ids != PAD
    out, out_mask, slots = insert_mask_slot(ids, mask, [55, 56], MASK, PAD)
    assert out.tolist() == [[CLS, 7, 8, 55, 56, MASK, SEP, PAD], [CLS, 9, 10, 11, 55, 56, MASK, SEP]]
    assert out_mask.tolist() == [[True] * 7 + [False], [True] * 8]
    assert slots.tolist() == [5, 6] and out[torch.arange(2), slots].tolist() == [MASK, MASK]


def test_retrieval_score_is_p_true_over_p_true_plus_false():
    words = Words("minilm")
    logits = torch.randn(5, 30522)
    probs = torch.softmax(logits, -1)
    expected = probs[:, words.true] / (probs[:, words.true] + probs[:, words.false])
    torch.testing.assert_close(true_score(logits, words.true, words.false), expected)


def test_pair_scores_equal_one_forward_per_pair():
    model, words = tiny(), Words("minilm")
    frames = torch.randn(3, 3, 3, 64, 64)
    ids = torch.tensor([[CLS, 1200, 1300, SEP], [CLS, 1400, SEP, PAD]])
    mask = ids != PAD
    scores = pair_scores(model, words, frames, ids, mask, batch_size=2, size_txt=9)
    texts = [[CLS, 1200, 1300, SEP], [CLS, 1400, SEP]]
    for t in range(2):  # naive: each pair alone, in the official layout ([MASK] at position 9)
        logits = official_slot_logits(model, frames, [texts[t]] * 3, 9)
        torch.testing.assert_close(scores[t], true_score(logits, words.true, words.false), rtol=1e-4, atol=1e-5)


def test_answer_words_outside_the_vocabulary_are_marked():
    words = Words("minilm")
    assert words.answer_token("red") == words.tokenizer.convert_tokens_to_ids("red")
    assert words.answer_token("xylophonist") == -100  # several WordPieces: LAVENDER cannot answer it


def test_size_figures_of_lavender():
    tiny_figures = size_figures(FramesModelConfig(arch="lavender", flavour="tiny", image_size=64, num_frames=3,
                                                  max_text_tokens=16))
    assert tiny_figures["model.parameters"] > 30522 * 64 and tiny_figures["model.gflops_per_clip"] > 0


# --- multiple-choice QA and multi-task fine-tuning, through the same head ----------------------------

MC_QUESTION = "which caption describes the clip?"


def jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def clip_rows(n: int) -> list[dict]:
    """Frames-set rows of ``n`` one-clip videos (video ``vI`` starts at I seconds)."""
    rng = np.random.default_rng(0)
    return [{"video_id": f"v{i}", "clip_index": 0, "start_s": float(i), "texts": [f"caption {i}"],
             "jpeg": [jpeg(rng) for _ in range(3)]} for i in range(n)]


def mc_questions(n: int) -> dict:
    options = [["red square moves left", "blue square moves left", "red circle moves up"],
               ["green star moves down", "green star moves up"]]
    return {(f"v{i}", i * 1000): [{"video": f"v{i}", "question": MC_QUESTION, "options": options[i % 2],
                                   "answer": i % 2, "start": float(i), "end": i + 1.0}] for i in range(n)}


def mc_examples(n: int = 2, **kw) -> list[dict]:
    return clip_examples(clip_rows(n), keep=None, num_frames=3, image_size=64, tokenizer="minilm",
                         max_text_tokens=24, mc=mc_questions(n), with_meta=True, **kw)


def test_mc_examples_are_one_per_option_question_sep_option_with_the_right_one_matched():
    tok = Words("minilm").tokenizer
    examples = mc_examples()
    assert [(e["video_id"], e["option_index"], e["match"]) for e in examples] == [
        ("v0", 0, 1), ("v0", 1, 0), ("v0", 2, 0), ("v1", 0, 0), ("v1", 1, 1)]
    expected = tok(MC_QUESTION, "blue square moves left")["input_ids"]
    assert examples[1]["text_ids"].tolist() == expected and expected.count(SEP) == 2
    # Scored through retrieval (mc_question=False) an option stands alone, as a caption does.
    alone = mc_examples(mc_question=False)
    assert alone[1]["text_ids"].tolist() == tok("blue square moves left")["input_ids"]


def test_a_pair_too_long_is_cut_in_the_question_keeping_every_option_whole():
    tok = Words("minilm").tokenizer
    options = ["a red square moves left and a blue circle moves up",
               "a red square moves left and a blue circle moves down"]
    mc = {("v0", 0): [{"video": "v0", "question": MC_QUESTION, "answer": 0, "start": 0.0, "end": 1.0,
                       "options": options}]}
    width = len(tok(options[0])["input_ids"]) + 2  # room for the option and only 1 question token
    examples = clip_examples(clip_rows(1), keep=None, num_frames=3, image_size=64, tokenizer="minilm",
                             max_text_tokens=width, mc=mc, with_meta=True)
    for e in examples:  # the options differ in their last word: it must survive the cut
        option = tok(e["text"], add_special_tokens=False)["input_ids"]
        question = tok(MC_QUESTION, add_special_tokens=False)["input_ids"]
        assert e["text_ids"].tolist() == [CLS, question[0], SEP, *option, SEP]
    assert examples[0]["text_ids"].tolist() != examples[1]["text_ids"].tolist()


def test_mc_option_scores_equal_one_forward_per_question_and_option():
    net, words = tiny(), Words("minilm")
    examples = mc_examples()
    scores = MatchingScorer(LavenderRetrievalModel(net), MODEL_24, batch_size=2).option_scores(examples)
    assert scores.shape == (5,)
    for e, score in zip(examples, scores):  # naive: each pair alone, the official layout (main_retmc_mlm.py)
        frames = torch.from_numpy(e["frames"]).permute(0, 3, 1, 2)[None].float() / 127.5 - 1.0
        logits = official_slot_logits(net, frames, [e["text_ids"].tolist()], 24)[0]
        probs = torch.softmax(logits, -1)
        expected = probs[words.true] / (probs[words.true] + probs[words.false])
        assert abs(float(score) - float(expected)) < 1e-5


def test_all_in_one_scores_mc_options_through_retrieval():
    from vidray.objectives.allinone import RetrievalModel

    cfg = FramesModelConfig(arch="allinone", flavour="tiny", image_size=64, num_frames=3, max_text_tokens=24)
    torch.manual_seed(0)
    model = RetrievalModel(build_net(cfg)).eval()
    examples = mc_examples(mc_question=False)
    scores = TowerScorer(model, cfg, batch_size=2).option_scores(examples)
    for e, score in zip(examples, scores):  # the retrieval score: text vector . clip vector, one pair at a time
        frames = torch.from_numpy(e["frames"]).permute(0, 3, 1, 2)[None].float() / 127.5 - 1.0
        ids = torch.from_numpy(e["text_ids"])[None]
        with torch.no_grad():
            expected = model.net.encode_text(ids, torch.ones_like(ids, dtype=torch.bool)) @ model.net.encode_video(frames).T
        assert abs(float(score) - float(expected)) < 1e-5


def test_mc_picks_the_best_option_per_question_and_ties_count_wrong():
    examples = mc_examples()
    # v0: the right option (0) scores highest; v1: the right option (1) ties with the wrong one.
    metrics, table = evaluate_mc(np.array([0.9, 0.2, 0.1, 0.5, 0.5]), examples)
    assert [r["correct"] for r in table] == [True, False]
    assert table[0]["answer"] == table[0]["picked"] == "red square moves left"
    assert table[1]["answer"] == "green star moves up" and table[1]["question"] == MC_QUESTION
    assert metrics == {"mc_accuracy": 0.5, "mc_chance": (1 / 3 + 1 / 2) / 2, "mc_questions": 2}


def finetune_cfg(task: str, tasks: list[str] = ()) -> FramesFinetuneConfig:
    return FramesFinetuneConfig(task=task, tasks=list(tasks), answers=["red", "blue", "left"],
                                model=FramesModelConfig(arch="lavender", flavour="tiny", image_size=64,
                                                        num_frames=3, max_text_tokens=24))


def mixed_examples() -> list[dict]:
    """Rows of every task, interleaved: retrieval captions, QA questions and MC options."""
    tok = Words("minilm").tokenizer
    frames = [e["frames"] for e in mc_examples(4)][::2]

    def row(i, text, task, answer=IGNORE_INDEX, match=IGNORE_INDEX):
        return {"frames": frames[i % len(frames)], "text_ids": np.asarray(tok(*text)["input_ids"]),
                "task": FINETUNE_TASKS.index(task), "answer": answer, "match": match}

    return [row(0, ["a red square moves left"], "retrieval"), row(1, ["what colour is it?"], "qa", answer=0),
            row(0, [MC_QUESTION, "red square"], "mc", match=1), row(1, ["a blue star rises"], "retrieval"),
            row(2, [MC_QUESTION, "blue star moves up"], "mc", match=0), row(2, ["which way?"], "qa", answer=2),
            row(2, ["a green circle"], "retrieval"), row(1, ["what kind of shape moves?"], "qa", answer=IGNORE_INDEX)]


def test_multitask_step_is_the_sum_of_the_single_task_losses_on_the_same_rows():
    cfg = finetune_cfg("multi", ["retrieval", "qa", "mc"])
    torch.manual_seed(0)
    multi = LavenderFinetuneSystem(cfg, torch.device("cpu"))
    multi.model.eval()  # no dropout: the same rows must give the same losses
    examples = mixed_examples()
    loss, logs = multi.training_step(multi.collate(examples))
    expected = 0.0
    for task in ("retrieval", "qa", "mc"):  # each single-task model on its own rows, collated alone
        single = LavenderFinetuneSystem(dataclasses.replace(cfg, task=task, tasks=[]), torch.device("cpu"))
        single.model.load_state_dict(multi.model.state_dict())  # the same net (each model holds only net.*)
        single.model.eval()
        rows = [e for e in examples if e["task"] == FINETUNE_TASKS.index(task)]
        task_loss, task_logs = single.training_step(single.collate(rows))
        assert logs[f"{task}_loss"] == pytest.approx(task_loss.item(), rel=1e-5)
        for name, value in task_logs.items():
            assert logs[name if name.startswith(task) else f"{task}_{name}"] == pytest.approx(value)
        expected = expected + task_loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # A batch without a task's rows leaves that task out (its loss is not a zero in the sum).
    loss, logs = multi.training_step(multi.collate([e for e in examples if e["task"] != FINETUNE_TASKS.index("mc")]))
    assert "mc_loss" not in logs and loss.item() == pytest.approx(logs["retrieval_loss"] + logs["qa_loss"], rel=1e-5)


def test_multitask_config_is_validated_naming_the_key():
    lavender = {"model": {"arch": "lavender"}}
    cases = [({"task": "multi", "tasks": ["retrieval", "captioning"], **lavender}, "tasks[1]", "must be one of"),
             ({"task": "multi", **lavender}, "tasks", "is required with task=multi"),
             ({"task": "multi", "tasks": ["qa", "mc", "qa"], **lavender}, "tasks", "names qa more than once"),
             ({"task": "qa", "tasks": ["qa"], **lavender}, "tasks", "is for task=multi"),
             ({"task": "mc", "model": {"arch": "allinone"}}, "task",
              "mc fine-tuning is LAVENDER's; All-in-one scores MC through retrieval")]
    for raw, key, message in cases:
        with pytest.raises(ConfigError) as err:
            from_dict(FramesFinetuneConfig, raw)
        assert err.value.key == key and message in str(err.value), (raw, str(err.value))
    cfg = from_dict(FramesFinetuneConfig, {"task": "multi", "tasks": ["mc", "qa"], **lavender})
    assert cfg.trained_tasks() == ["mc", "qa"] and finetune_cfg("qa").trained_tasks() == ["qa"]


@pytest.mark.parametrize("task,tasks", [("mc", []), ("multi", ["retrieval", "mc"])])
def test_mc_without_data_mc_fails_before_anything_starts(task, tasks):
    cfg = dataclasses.replace(finetune_cfg(task, tasks), data=FramesDataConfig(frames="/nowhere/frames/v-0"))
    with pytest.raises(ConfigError) as err:
        run_frames_finetune(cfg, say=lambda m: None)
    assert err.value.key == "data.mc" and "mc.jsonl" in str(err.value)
