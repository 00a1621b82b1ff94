"""A training checkpoint on storage: the one file a run saves per checkpoint folder, read safely.

Jobs, evaluators and extractors that start from a checkpoint (``init_from``, `vidray evaluate`,
the VQ extractor) read it through :func:`load_state`; :mod:`vidray.train.loop` writes it.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import Any

import torch

from vidray import storage
from vidray.config import ConfigError

CHECKPOINT_FILE = "state.pt"


def read_checkpoint(data, name: str) -> dict:
    """A saved training state from a path or file object. ``weights_only=True``: a checkpoint holds
    tensors and plain values, never objects, so loading one cannot run code."""
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{name}: holds Python objects besides tensors and plain values, so it is not "
                         "loaded (a checkpoint from an older vidray, or not ours); train it again with "
                         f"this version ({str(err).splitlines()[0]})") from None


def load_state(checkpoint: str) -> dict:
    """The training state saved in a checkpoint folder (local or s3://)."""
    uri = storage.join(checkpoint, CHECKPOINT_FILE)
    if not storage.exists(uri):
        raise ConfigError("checkpoint", f"{uri} does not exist; give a checkpoint folder "
                          "(…/<run name>/checkpoint_NNNNNNNN) written by `vidray pretrain` or `vidray finetune`")
    return read_checkpoint(io.BytesIO(storage.read_bytes(uri)), uri)


def require_same_model(state: dict, model_cfg: Any) -> None:
    """Refuse ``init_from`` a checkpoint whose ``model.*`` differs, naming every differing key."""
    saved = state["config"]["model"]
    differ = [k for k, v in dataclasses.asdict(model_cfg).items() if saved.get(k) != v]
    if differ:
        raise ConfigError("model." + differ[0], "differs from the checkpoint in init_from ("
                          + ", ".join(f"{k}: {saved.get(k)!r} there" for k in differ)
                          + "); set the same model.* values")


def init_from(module: torch.nn.Module, checkpoint: str, model_cfg: Any, prefix: str,
              fresh: tuple[str, ...] = ()) -> None:
    """Start ``module`` from the weights under ``prefix`` of a pre-training (or fine-tuning)
    checkpoint (``init_from``), after checking that its ``model.*`` is this run's. Submodules named
    in ``fresh`` (a task head: All-in-one's QA classifier) keep their new initialisation whether the
    checkpoint has them or not; anything else that does not match is refused, naming ``init_from``."""
    state = load_state(checkpoint)
    require_same_model(state, model_cfg)
    weights = {k[len(prefix):]: v for k, v in state["model"].items()
               if k.startswith(prefix) and not k[len(prefix):].startswith(fresh)}
    missing, unexpected = module.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith(fresh)]
    if missing or unexpected:
        raise ConfigError("init_from", f"{checkpoint} does not hold this model's weights "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
