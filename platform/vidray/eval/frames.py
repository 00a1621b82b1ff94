"""How a fine-tuned frames model scores what the evaluators score, per recipe
(:data:`vidray.archs.FramesArch.recipe`): a text-by-clip similarity matrix (retrieval), one score
per (question + option, clip) pair (multiple choice), and an answer per question (open-ended QA).

    scorer = scorer_of(model, ft.model, batch_size=64)
    similarity = scorer.similarity(examples)              # [texts, clips]

The metrics of these scores are written once for every model (:mod:`vidray.eval`).
"""

from __future__ import annotations

import numpy as np
import torch

from vidray.archs import frames_arch
from vidray.data.frames import collate
from vidray.models.weights import text_tokenizer
from vidray.train.lavender_tasks import Words, append_mask_slot, insert_mask_slot, pair_scores, true_score


class TowerScorer:
    """All-in-one's recipe (E-ViLM's too): retrieval and MC from the separate text and video passes
    (the dot product of their unit embeddings), QA as the best class of the answer classifier."""

    def __init__(self, model: torch.nn.Module, model_cfg, batch_size: int):
        self.model, self.batch_size, self.width = model, batch_size, model_cfg.max_text_tokens
        self.pad_id = text_tokenizer(model_cfg.tokenizer).pad_token_id

    def batches(self, examples: list[dict]):
        for i in range(0, len(examples), self.batch_size):
            yield collate(examples[i:i + self.batch_size], self.width, self.pad_id)

    @torch.no_grad()
    def similarity(self, examples: list[dict]) -> np.ndarray:
        texts, videos = [], []
        for batch in self.batches(examples):
            texts.append(self.model.net.encode_text(batch["text_ids"], batch["text_mask"]))
            videos.append(self.model.net.encode_video(batch["frames"]))
        return (torch.cat(texts) @ torch.cat(videos).T).numpy()

    @torch.no_grad()
    def option_scores(self, examples: list[dict]) -> np.ndarray:
        """Each MC example's score: its option's text against its clip, the retrieval score."""
        net = self.model.net
        scores = [(net.encode_text(b["text_ids"], b["text_mask"]) * net.encode_video(b["frames"])).sum(-1)
                  for b in self.batches(examples)]
        return torch.cat(scores).float().numpy() if scores else np.zeros(0, np.float32)

    @torch.no_grad()
    def answers(self, examples: list[dict], answers: list[str]) -> list[str]:
        predicted: list[str] = []
        for batch in self.batches(examples):
            best = self.model.logits(batch["frames"], batch["text_ids"], batch["text_mask"]).argmax(-1).tolist()
            predicted += [answers[i] for i in best]
        return predicted


class MatchingScorer(TowerScorer):
    """LAVENDER's recipe, every task through the MLM head: a (text, clip) pair scores
    p(true) / (p(true) + p(false)) at a [MASK] appended to the text, one joint pass per pair (MC's
    options likewise); QA reads the word at the [MASK] after "answer:" (any word of the vocabulary)."""

    def __init__(self, model: torch.nn.Module, model_cfg, batch_size: int):
        super().__init__(model, model_cfg, batch_size)
        self.words = Words(model_cfg.tokenizer)

    @torch.no_grad()
    def similarity(self, examples: list[dict]) -> np.ndarray:
        batch = collate(examples, self.width, self.pad_id)
        return pair_scores(self.model.net, self.words, batch["frames"], batch["text_ids"], batch["text_mask"],
                           self.batch_size, self.width).numpy()

    @torch.no_grad()
    def option_scores(self, examples: list[dict]) -> np.ndarray:
        scores = []
        for batch in self.batches(examples):
            ids, mask, positions, slots = append_mask_slot(batch["text_ids"], batch["text_mask"], self.width,
                                                           self.words.mask)
            logits = self.model.net(batch["frames"], ids, mask, slots=slots, positions=positions)
            scores.append(true_score(logits, self.words.true, self.words.false))
        return torch.cat(scores).float().numpy() if scores else np.zeros(0, np.float32)

    @torch.no_grad()
    def answers(self, examples: list[dict], answers: list[str]) -> list[str]:
        w, predicted = self.words, []
        for batch in self.batches(examples):
            ids, mask, slots = insert_mask_slot(batch["text_ids"], batch["text_mask"], w.answer_prefix, w.mask, w.pad)
            best = self.model.net(batch["frames"], ids, mask, slots=slots).argmax(-1).tolist()
            predicted += w.tokenizer.convert_ids_to_tokens(best)
        return predicted


# recipe -> its scorer
SCORERS: dict[str, type[TowerScorer]] = {"allinone": TowerScorer, "lavender": MatchingScorer}


def scorer_of(model: torch.nn.Module, model_cfg, batch_size: int) -> TowerScorer:
    """The scorer of ``model`` (a fine-tuned task module of ``model_cfg.arch``), in eval mode."""
    return SCORERS[frames_arch(model_cfg.arch).recipe](model.eval(), model_cfg, batch_size)
