"""LAVENDER's training systems: pre-training (MLM + matching as MLM) and fine-tuning for one task
or several at once, over the task formulations of :mod:`vidray.objectives.lavender`."""

from __future__ import annotations

from functools import partial

import torch

from vidray.checkpoint import init_from
from vidray.config.frames import FINETUNE_TASKS
from vidray.data.frames import collate
from vidray.models.build import build_net
from vidray.objectives.lavender import (LavenderPretrainModel, Words, append_mask_slot, insert_mask_slot,
                                        match_targets, matching_batch, option_pairs, sampled_pairs, task_model)
from vidray.objectives.masking import IGNORE_INDEX, mask_text


class LavenderPretrainSystem:
    def __init__(self, cfg, device: torch.device):
        self.cfg, self.words = cfg, Words(cfg.model.tokenizer)
        self.model = LavenderPretrainModel(build_net(cfg.model), cfg.objective.vtm_weight).to(device)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.collate = partial(collate, max_text_tokens=cfg.model.max_text_tokens, pad_id=self.words.pad)

    def _step(self, batch: dict, generator: torch.Generator):
        w, device = self.words, batch["frames"].device
        ids, mask = batch["text_ids"].cpu(), batch["text_mask"].cpu()
        inputs, targets = mask_text(ids, mask, self.cfg.objective.mlm_prob, w.mask, w.vocab, generator,
                                    w.special, always_mask=True)
        # The official appends the matching [MASK] to every text (Dataset_Pretrain_MLM.str2txt) and
        # matches on the MLM-masked texts: one text for both passes, the slot predicting no word.
        ids, mask, positions, slots = append_mask_slot(inputs, mask, self.cfg.model.max_text_tokens, w.mask)
        targets = torch.cat([targets, torch.full((len(ids), 1), IGNORE_INDEX, dtype=targets.dtype)], 1)
        clips, texts = sampled_pairs(len(ids), self.cfg.objective.vtm_negatives, generator)
        inputs = (ids, mask, positions, targets, slots, clips, texts, match_targets(clips, texts, w))
        return self.model(batch["frames"], *(t.to(device) for t in inputs))

    def training_step(self, batch: dict):
        return self._step(batch, self.generator)

    def validation_step(self, batch: dict, generator: torch.Generator) -> dict[str, float]:
        loss, logs = self._step(batch, generator)
        return {"loss": loss.item(), **logs}


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

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.words = cfg, Words(cfg.model.tokenizer)
        self.task = cfg.task
        model = task_model(cfg)
        if cfg.init_from:
            init_from(model.net, cfg.init_from, cfg.model, prefix="net.")
        self.model = model.to(device)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)  # match_negatives' draws
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
                              self.cfg.model.max_text_tokens, self.cfg.match_negatives, self.generator)
        return tuple(t.to(batch["frames"].device) for t in pair)

    def mc_inputs(self, batch: dict) -> tuple:
        return option_pairs(batch["frames"], batch["text_ids"].cpu(), batch["text_mask"].cpu(), batch["match"],
                            self.words, self.cfg.model.max_text_tokens)

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
