"""The GPU path's bf16 autocast, exercised on CPU (torch autocasts CPU matmuls to bf16 too): every
pre-training system's step runs under it, with a loss close to fp32's and finite fp32 gradients.
Catches dtype mistakes (a bf16 activation meeting an fp32 buffer, a loss softmax in bf16) that
would otherwise first show on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidray.config.frames import FramesModelConfig, FramesPretrainConfig
from vidray.config.train import PretrainConfig
from vidray.models.vlm import SEP_ID
from vidray.train.frames_system import build_pretrain_system
from vidray.train.vlm_system import build_system

B = 4


def vlm_batch(system, cfg) -> dict:
    rng = np.random.default_rng(0)
    lv, lt = 6, 10
    video_mask = torch.ones(B, lv, dtype=torch.bool)
    video_mask[0, 4:] = False
    text_mask = torch.ones(B, lt, dtype=torch.bool)
    text_mask[1, 7:] = False
    text_ids = torch.as_tensor(rng.integers(1000, 2000, (B, lt)))
    text_ids[:, -1] = SEP_ID
    text_ids[1, 6], text_ids[1, 7:] = SEP_ID, 0  # a shorter text: its [SEP], then padding
    video = torch.as_tensor(rng.standard_normal((B, lv, cfg.model.video_dim)), dtype=torch.float32)
    return {"video": video * video_mask[..., None], "video_mask": video_mask, "text_ids": text_ids,
            "text_mask": text_mask}


def frames_batch(system, cfg) -> dict:
    rng = np.random.default_rng(0)
    size, frames = cfg.model.image_size, cfg.model.num_frames
    rows = [{"frames": rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
             "text_ids": np.asarray([101, *rng.integers(2000, 3000, 5 + i), 102])} for i in range(B)]
    return system.collate(rows)


def vlm_system(objective: str):
    cfg = PretrainConfig()
    cfg.model.flavour, cfg.model.video_dim, cfg.objective.name = "tiny", 512, objective
    return build_system(cfg, torch.device("cpu")), cfg, vlm_batch


def frames_system(arch: str):
    cfg = FramesPretrainConfig(model=FramesModelConfig(arch=arch, flavour="tiny", image_size=64, num_frames=3,
                                                       max_text_tokens=16))
    return build_pretrain_system(cfg, torch.device("cpu")), cfg, frames_batch


SYSTEMS = {"vlm-masked_token": lambda: vlm_system("masked_token"), "vlm-mfm_mlm": lambda: vlm_system("mfm_mlm"),
           "allinone": lambda: frames_system("allinone"), "lavender": lambda: frames_system("lavender"),
           "evilm": lambda: frames_system("evilm")}


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_a_training_step_under_bf16_autocast_matches_fp32(name):
    torch.manual_seed(0)
    system, cfg, make_batch = SYSTEMS[name]()
    system.model.eval()  # no dropout: both precisions compute the same function
    prepared = getattr(system, "prepare", lambda batch: batch)(make_batch(system, cfg))  # as the loop does

    fp32_loss, _ = system.training_step(prepared)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss, logs = system.training_step(prepared)
    bf16_loss.backward()

    assert bf16_loss.dtype == torch.float32  # the losses are computed in fp32 whatever the autocast
    assert torch.isfinite(bf16_loss) and all(np.isfinite(v) for v in logs.values() if isinstance(v, float))
    assert bf16_loss.item() == pytest.approx(fp32_loss.item(), rel=0.05)
    assert bf16_loss.item() != fp32_loss.item()  # the autocast did reach the model's matmuls
    grads = [p.grad for p in system.model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
