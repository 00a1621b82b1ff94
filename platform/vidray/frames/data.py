"""Examples of the frames models from the ``frames`` feature set (one row per clip, JPEG frames).

An example is a clip's frames, ``uint8 [T, S, S, 3]`` (``model.num_frames`` evenly picked from the
set's frames, resized to ``model.image_size``), with token ids of its caption (pre-training,
retrieval) or of one question about it plus the answer's index (open-ended QA). Questions come
from a QA jsonl and are matched to clips by video and start time: the synthetic corpus writes one
clip per event and its questions carry the event's ``start``.

:func:`collate` pads a batch into ``frames [B, T, 3, S, S]`` (scaled to [-1, 1]), ``text_ids``,
``text_mask`` (and ``answer``).
"""

from __future__ import annotations

import functools
import io
import json

import numpy as np
import pyarrow as pa

from vidray.config import ConfigError
from vidray.manifest import split_videos

IGNORE_INDEX = -100
CLIP_COLUMNS = ["video_id", "clip_index", "start_s", "texts", "jpeg"]


@functools.lru_cache(maxsize=4)
def tokenizer_for(name: str):
    """The tokenizer of ``model.tokenizer`` (loaded once per process)."""
    from transformers import AutoTokenizer

    from vidray.feature_store.extractors import resolve_tokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_tokenizer(name))
    except OSError as err:
        raise ConfigError("model.tokenizer", f"cannot load tokenizer {name!r} ({err}); use 'minilm' "
                          "or a local tokenizer folder") from None


def pick_frames(available: int, wanted: int) -> np.ndarray:
    """Indices of ``wanted`` frames spread evenly over ``available`` (repeats when there are fewer)."""
    return np.linspace(0, available - 1, wanted).round().astype(int)


def decode_clip(jpegs: list[bytes], num_frames: int, image_size: int) -> np.ndarray:
    """``uint8 [num_frames, image_size, image_size, 3]`` from a clip's JPEG frames."""
    from PIL import Image

    out = np.empty((num_frames, image_size, image_size, 3), np.uint8)
    for slot, index in enumerate(pick_frames(len(jpegs), num_frames)):
        image = Image.open(io.BytesIO(jpegs[index])).convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        out[slot] = np.asarray(image)
    return out


def _start_key(seconds: float) -> int:
    return round(float(seconds) * 1000)  # milliseconds: the clip's and the question's start agree


def read_qa(uri: str) -> dict[tuple[str, int], list[dict]]:
    """Questions of a QA jsonl per (video, start in ms)."""
    from vidray import storage

    if not uri:
        raise ConfigError("data.qa", "is required for the qa task: a jsonl of {video, question, answer, "
                          "start, end} (the synthetic corpus writes qa.jsonl)")
    if not storage.exists(uri):
        raise ConfigError("data.qa", f"{uri} does not exist")
    out: dict[tuple[str, int], list[dict]] = {}
    for number, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"video", "question", "answer", "start"} - set(row)
        if missing:
            raise ConfigError("data.qa", f"{uri} line {number} lacks {sorted(missing)}")
        out.setdefault((row["video"], _start_key(row["start"])), []).append(row)
    return out


def answer_vocabulary(qa: dict, keep: set[str] | None) -> list[str]:
    """Every answer of the questions about videos in ``keep`` (all videos if None), sorted."""
    return sorted({q["answer"] for (video, _), rows in qa.items() if keep is None or video in keep
                   for q in rows})


def clip_examples(batch: pa.Table, *, keep: set[str] | None, num_frames: int, image_size: int,
                  tokenizer: str, max_text_tokens: int, qa: dict | None = None,
                  answers: list[str] | None = None, with_meta: bool = False, vq=None) -> list[dict]:
    """The examples of a batch of frames-set rows: one per clip (its first caption), or with ``qa``
    one per question about the clip. ``with_meta`` keeps ids, texts and question types. ``vq``
    (a :class:`VQCodes` or its Ray object ref) adds each clip's ``vq_codes``; clips it lacks are left
    out (the driver reports how many, see :func:`vq_codes_for`)."""
    tok = tokenizer_for(tokenizer)
    answer_index = {a: i for i, a in enumerate(answers or [])}
    codes = VQCodes.resolve(vq)
    out = []
    for row in batch.to_pylist():
        if keep is not None and row["video_id"] not in keep:
            continue
        clip_codes = None
        if codes is not None:
            clip_codes = codes.get(row["video_id"], row["clip_index"])
            if clip_codes is None:
                continue
        if qa is None:
            if not row["texts"]:
                continue
            items = [(row["texts"][0], None)]
        else:
            items = [(q["question"], q) for q in qa.get((row["video_id"], _start_key(row["start_s"])), [])]
        if not items:
            continue
        frames = decode_clip(row["jpeg"], num_frames, image_size)
        for text, question in items:
            ids = tok(text.lower(), truncation=True, max_length=max_text_tokens)["input_ids"]
            example = {"frames": frames, "text_ids": np.asarray(ids, np.int64)}
            if question is not None:
                example["answer"] = answer_index.get(question["answer"], IGNORE_INDEX)
            if clip_codes is not None:
                example["vq_codes"] = clip_codes
            if with_meta:
                example.update(video_id=row["video_id"], clip_index=row["clip_index"], text=text,
                               answer_text=question["answer"] if question else None,
                               question_type=(question or {}).get("type"))
            out.append(example)
    return out


def _to_examples(batch: pa.Table, **kwargs) -> dict:
    examples = clip_examples(batch, **kwargs)
    ids = np.empty(len(examples), dtype=object)
    ids[:] = [e["text_ids"] for e in examples]
    out = {"frames": np.stack([e["frames"] for e in examples]) if examples
           else np.zeros((0, kwargs["num_frames"], kwargs["image_size"], kwargs["image_size"], 3), np.uint8),
           "text_ids": ids}
    if kwargs.get("qa") is not None:
        out["answer"] = np.asarray([e["answer"] for e in examples], np.int64)
    if kwargs.get("vq") is not None:
        out["vq_codes"] = (np.stack([e["vq_codes"] for e in examples]) if examples
                           else np.zeros((0, 0), np.int64))
    return out


def example_kwargs(model, data, split: str, qa: dict | None = None, answers: list[str] | None = None,
                   vq=None) -> dict:
    return {"keep": split_videos(data.manifest, split), "num_frames": model.num_frames,
            "image_size": model.image_size, "tokenizer": model.tokenizer,
            "max_text_tokens": model.max_text_tokens, "qa": qa, "answers": answers, "vq": vq}


def examples_dataset(model, data, split: str, qa: dict | None = None, answers: list[str] | None = None,
                     vq=None):
    """A Ray Dataset of examples (``frames``, ``text_ids`` [, ``answer``] [, ``vq_codes``]) of one split."""
    from vidray.feature_store import store

    if not data.frames:
        raise ConfigError("data.frames", "is required: the URI of a committed frames feature-set version "
                          "(see `vidray features ls ROOT`)")
    ds = store.open_dataset(data.frames, columns=CLIP_COLUMNS)
    return ds.map_batches(_to_examples, batch_format="pyarrow", batch_size=16,
                          fn_kwargs=example_kwargs(model, data, split, qa, answers, vq))


def read_examples(model, data, split: str, qa: dict | None = None, answers: list[str] | None = None) -> list[dict]:
    """Every example of a split, with its ids and texts (evaluation; no Ray)."""
    from vidray.feature_store import store

    parts = [store.read_parquet(u, CLIP_COLUMNS) for u in store.open_version(data.frames).part_uris]
    return clip_examples(pa.concat_tables(parts), with_meta=True,
                         **example_kwargs(model, data, split, qa, answers))


def collate(examples: dict, max_text_tokens: int, pad_id: int = 0) -> dict:
    """Pad a batch (numpy dict from Ray Data, or a list of examples) into model tensors."""
    import torch

    if isinstance(examples, list):
        examples = {k: [e[k] for e in examples] for k in ("frames", "text_ids", "answer", "vq_codes")
                    if k in examples[0]}
    frames = torch.from_numpy(np.stack(list(examples["frames"]))).permute(0, 1, 4, 2, 3)
    texts = [np.asarray(t, np.int64)[:max_text_tokens] for t in examples["text_ids"]]
    width = max(len(t) for t in texts)
    text_ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    text_mask = torch.zeros(len(texts), width, dtype=torch.bool)
    for b, t in enumerate(texts):
        text_ids[b, :len(t)] = torch.from_numpy(t)
        text_mask[b, :len(t)] = True
    batch = {"frames": frames.float() / 127.5 - 1.0, "text_ids": text_ids, "text_mask": text_mask}
    if "answer" in examples:
        batch["answer"] = torch.as_tensor(np.asarray(examples["answer"], np.int64))
    if "vq_codes" in examples:
        batch["vq_codes"] = torch.as_tensor(np.stack(list(examples["vq_codes"])).astype(np.int64))
    return batch


# --- VQ codes (E-ViLM's MVM targets) ---------------------------------------------------------------

class VQCodes:
    """Every clip's codes of a ``vq`` feature set, as two arrays (keys, ``int32 [clips, N]``) so
    Ray shares one copy per node through the object store; the lookup dict is built once per
    process. Memory: 4 bytes x N codes per clip (WebVid-2.5M at 4 x 8 x 8 codes: ~2.6 GB)."""

    _cache: dict[str, "VQCodes"] = {}

    def __init__(self, uri: str, keys: np.ndarray, codes: np.ndarray):
        self.uri, self.keys, self.codes = uri, keys, codes
        self._index: dict[str, int] | None = None

    @classmethod
    def read(cls, uri: str) -> "VQCodes":
        from vidray.feature_store import store

        parts = [store.read_parquet(u, ["video_id", "clip_index", "codes"]) for u in store.open_version(uri).part_uris]
        table = pa.concat_tables(parts)
        keys = np.asarray([f"{v}\t{c}" for v, c in zip(table["video_id"].to_pylist(),
                                                         table["clip_index"].to_pylist())])
        flat = table["codes"].combine_chunks()
        width = len(flat[0]) if len(flat) else 0
        codes = np.asarray(flat.flatten(), np.int32).reshape(len(flat), width)
        return cls(uri, keys, codes)

    @staticmethod
    def resolve(vq) -> "VQCodes | None":
        """``vq`` itself, or the object behind a Ray object ref (fetched once per process)."""
        if vq is None or isinstance(vq, VQCodes):
            return vq
        import ray

        key = vq.hex()
        if key not in VQCodes._cache:
            VQCodes._cache[key] = ray.get(vq)
        return VQCodes._cache[key]

    def get(self, video_id: str, clip_index: int) -> np.ndarray | None:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys.tolist())}
        i = self._index.get(f"{video_id}\t{clip_index}")
        return None if i is None else self.codes[i]

    def __getstate__(self):  # the index is rebuilt where it is used
        return {"uri": self.uri, "keys": self.keys, "codes": self.codes, "_index": None}
