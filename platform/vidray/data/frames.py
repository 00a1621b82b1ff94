"""Examples of the frames models from the ``frames`` feature set (one row per clip, JPEG frames).

An example is a clip's frames, ``uint8 [T, S, S, 3]`` (``model.num_frames`` evenly picked from the
set's frames, resized to ``model.image_size``), with token ids of its caption (pre-training,
retrieval) or of one question about it plus the answer's index (open-ended QA). Questions come
from a QA jsonl and are matched to clips by video and start time: the synthetic corpus writes one
clip per event and its questions carry the event's ``start``. Multiple-choice questions (an MC
jsonl, matched the same way) give one example per option, ``question [SEP] option``, with
``match`` 1 for the right option and 0 for the others.

With ``data.source=videos`` the clips come from ``data.manifest``'s videos instead, decoded at the
start of the run by the frames extractor's own sampler (:meth:`FramesExtractor.raw_clips`, with
:func:`video_sampler`'s settings), so each example has the same video id, clip index, start and
texts as the frames-set row it replaces and, up to JPEG error, the same pixels. A video that
cannot be decoded is skipped, recorded as the clip pipeline records it and named in a warning.

:func:`collate` pads a batch into ``frames [B, T, 3, S, S]`` (scaled to [-1, 1]), ``text_ids``,
``text_mask`` (and ``answer``, ``match``, and a multi-task row's ``task``).
"""

from __future__ import annotations

import json
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from vidray import storage
from vidray.config import ConfigError
from vidray.data.adapters import read_mc_rows
from vidray.data.manifest import read_manifest, split_videos
from vidray.feature_store.extractors import FramesExtractConfig, FramesExtractor
from vidray.models.pixels import decode_clip, pick_frames, square
from vidray.models.weights import text_tokenizer
from vidray.objectives.masking import IGNORE_INDEX


CLIP_COLUMNS = ["video_id", "clip_index", "start_s", "texts", "jpeg"]


def clip_frames(row: dict, num_frames: int, image_size: int) -> np.ndarray:
    """The model's frames of a clip row: its ``jpeg`` (a frames-set row) or its raw ``frames``
    (decoded on the fly), picked and resized the same way."""
    if "jpeg" in row:
        return decode_clip(row["jpeg"], num_frames, image_size)
    from PIL import Image

    picked = row["frames"][pick_frames(len(row["frames"]), num_frames)]
    if picked.shape[1:3] == (image_size, image_size):
        return picked  # the sampler already cut them at model.image_size: nothing to redo
    return np.stack([square(Image.fromarray(frame), image_size) for frame in picked])


def _start_key(seconds: float) -> int:
    return round(float(seconds) * 1000)  # milliseconds: the clip's and the question's start agree


def read_qa(uri: str) -> dict[tuple[str, int], list[dict]]:
    """Questions of a QA jsonl per (video, start in ms)."""

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


def read_mc(uri: str, key: str = "data.mc") -> dict[tuple[str, int], list[dict]]:
    """Multiple-choice questions of an MC jsonl per (video, start in ms), read and checked as VLM's
    evaluation reads them (``key``: the config key named in errors)."""
    out: dict[tuple[str, int], list[dict]] = {}
    for row in read_mc_rows(uri, key):
        out.setdefault((row["video"], _start_key(row["start"])), []).append(row)
    return out


def _clip_texts(row: dict, qa: dict | None, mc: dict | None, mc_question: bool) -> list[dict]:
    """The texts a clip row gives: its first caption; with ``qa`` one per question about it; with
    ``mc`` one per option of each MC question about it, after the question (``mc_question``; without
    it the option alone, as a retrieval model scores captions). ``texts``: what is tokenized (a
    question and an option as a pair: ``[CLS] q [SEP] o [SEP]``); ``meta``: what evaluation keeps."""
    key = (row["video_id"], _start_key(row["start_s"]))
    if mc is not None:
        return [{"texts": ([q["question"].lower()] if mc_question else []) + [option.lower()], "text": option,
                 "match": int(i == int(q["answer"])),
                 "meta": {"mc_key": f"{key[0]}@{key[1]}#{n}", "question": q["question"], "option_index": i,
                          "mc_answer": int(q["answer"])}}
                for n, q in enumerate(mc.get(key, [])) for i, option in enumerate(q["options"])]
    if qa is not None:
        return [{"texts": [q["question"].lower()], "text": q["question"], "qa": q} for q in qa.get(key, [])]
    return [{"texts": [row["texts"][0].lower()], "text": row["texts"][0]}] if row["texts"] else []


def token_ids(tok, texts: list[str], max_tokens: int) -> list[int]:
    """``[CLS] text [SEP]``, or for a (question, option) pair ``[CLS] question [SEP] option [SEP]``,
    within ``max_tokens``. A pair is cut from the question's end, the option kept whole where it
    fits: MC options differ in one word, often the last, and BERT's longest-first truncation made
    a long pair's options identical (measured: tied scores on most synthetic MC questions)."""
    if len(texts) == 1:
        return tok(texts[0], truncation=True, max_length=max_tokens)["input_ids"]
    question, option = (tok(t, add_special_tokens=False)["input_ids"] for t in texts)
    option = option[:max_tokens - 3]
    question = question[:max(0, max_tokens - 3 - len(option))]
    return [tok.cls_token_id, *question, tok.sep_token_id, *option, tok.sep_token_id]


def clip_examples(batch: pa.Table | list[dict], *, keep: set[str] | None, num_frames: int, image_size: int,
                  tokenizer: str, max_text_tokens: int, qa: dict | None = None,
                  answers: list[str] | None = None, with_meta: bool = False, vq=None,
                  mc: dict | None = None, mc_question: bool = True) -> list[dict]:
    """The examples of a batch of clip rows (frames-set rows, or clips decoded on the fly with raw
    ``frames``): one per clip (its first caption), or with ``qa`` one per question about the clip.
    ``with_meta`` keeps ids, texts and question types. ``vq`` (a :class:`VQCodes` or its Ray object
    ref) adds each clip's ``vq_codes``; clips it lacks are left out (the driver reports how many,
    see :func:`vq_codes_for`)."""
    tok = text_tokenizer(tokenizer)
    answer_index = {a: i for i, a in enumerate(answers or [])}
    codes = VQCodes.resolve(vq)
    out = []
    for row in batch.to_pylist() if isinstance(batch, pa.Table) else batch:
        if keep is not None and row["video_id"] not in keep:
            continue
        clip_codes = None
        if codes is not None:
            clip_codes = codes.get(row["video_id"], row["clip_index"])
            if clip_codes is None:
                continue
        items = _clip_texts(row, qa, mc, mc_question)
        if not items:
            continue
        frames = clip_frames(row, num_frames, image_size)
        for item in items:
            ids = token_ids(tok, item["texts"], max_text_tokens)
            example = {"frames": frames, "text_ids": np.asarray(ids, np.int64)}
            question = item.get("qa")
            if question is not None:
                example["answer"] = answer_index.get(question["answer"], IGNORE_INDEX)
            if "match" in item:
                example["match"] = item["match"]
            if clip_codes is not None:
                example["vq_codes"] = clip_codes
            if with_meta:
                example.update(video_id=row["video_id"], clip_index=row["clip_index"], text=item["text"],
                               answer_text=question["answer"] if question else None,
                               question_type=(question or {}).get("type"), **item.get("meta", {}))
            out.append(example)
    return out


def _to_examples(batch: pa.Table, **kwargs) -> dict:
    return _columns(clip_examples(batch, **kwargs), **kwargs)


def _columns(examples: list[dict], **kwargs) -> dict:
    """Examples as the columns of one Ray Data batch."""
    ids = np.empty(len(examples), dtype=object)
    ids[:] = [e["text_ids"] for e in examples]
    out = {"frames": np.stack([e["frames"] for e in examples]) if examples
           else np.zeros((0, kwargs["num_frames"], kwargs["image_size"], kwargs["image_size"], 3), np.uint8),
           "text_ids": ids}
    if kwargs.get("qa") is not None:
        out["answer"] = np.asarray([e["answer"] for e in examples], np.int64)
    if kwargs.get("mc") is not None:
        out["match"] = np.asarray([e["match"] for e in examples], np.int64)
    if kwargs.get("vq") is not None:
        out["vq_codes"] = (np.stack([e["vq_codes"] for e in examples]) if examples
                           else np.zeros((0, 0), np.int64))
    return out


def with_task_columns(batch: dict, task: int) -> dict:
    """A batch of one task's examples with the columns every task's rows share in a multi-task
    dataset: ``task`` (its index in FINETUNE_TASKS), and ``answer`` / ``match`` set to IGNORE_INDEX
    where the task has none, so rows of any task collate together."""
    rows = len(batch["text_ids"])
    out = dict(batch, task=np.full(rows, task, np.int64))
    for column in ("answer", "match"):
        if column not in out:
            out[column] = np.full(rows, IGNORE_INDEX, np.int64)
    return out


def example_kwargs(model, data, split: str, qa: dict | None = None, answers: list[str] | None = None,
                   vq=None, mc: dict | None = None, mc_question: bool = True) -> dict:
    return {"keep": split_videos(data.manifest, split), "num_frames": model.num_frames,
            "image_size": model.image_size, "tokenizer": model.tokenizer,
            "max_text_tokens": model.max_text_tokens, "qa": qa, "answers": answers, "vq": vq,
            "mc": mc, "mc_question": mc_question}


def examples_dataset(model, data, split: str, qa: dict | None = None, answers: list[str] | None = None,
                     vq=None, mc: dict | None = None, *, skipped_to: str = "", say: Callable[[str], None] = print):
    """A Ray Dataset of examples (``frames``, ``text_ids`` [, ``answer``] [, ``match``] [,
    ``vq_codes``]) of one split; with ``mc`` one per option of each MC question (``match`` 1 for
    the right option, 0 for the others).

    With ``data.source=videos`` the split's videos are decoded now and the dataset comes back
    materialised; videos that cannot be decoded are recorded under ``skipped_to`` (a folder on
    storage every node reaches) and named through ``say`` (:func:`video_examples_dataset`)."""
    from vidray.feature_store import store

    require_source(data)
    kwargs = example_kwargs(model, data, split, qa, answers, vq, mc)
    if data.source == "videos":
        return video_examples_dataset(model, data, split, kwargs, skipped_to, say)
    ds = store.open_dataset(data.frames, columns=CLIP_COLUMNS)
    return ds.map_batches(_to_examples, batch_format="pyarrow", batch_size=16, fn_kwargs=kwargs)


def read_clip_rows(model, data, split: str, say: Callable[[str], None] = print) -> pa.Table | list[dict]:
    """The clip rows of a split's data (evaluation; no Ray): the frames set's rows, or with
    ``data.source=videos`` the split's videos decoded in this process, unreadable ones skipped and
    named through ``say``. Read once, they serve every task's :func:`clip_examples`."""
    from vidray.feature_store import store

    require_source(data)
    if data.source == "videos":
        return read_video_clips(model, data, split, say)
    return pa.concat_tables([store.read_parquet(u, CLIP_COLUMNS) for u in store.open_version(data.frames).part_uris])


def read_examples(model, data, split: str, qa: dict | None = None, answers: list[str] | None = None,
                  say: Callable[[str], None] = print, mc: dict | None = None,
                  mc_question: bool = True, rows: pa.Table | list[dict] | None = None) -> list[dict]:
    """Every example of a split, with its ids and texts (evaluation; no Ray). ``mc``: one example
    per option (see :func:`_clip_texts`). ``rows``: the split's :func:`read_clip_rows`, when the
    caller already holds them (read otherwise)."""
    rows = read_clip_rows(model, data, split, say) if rows is None else rows
    return clip_examples(rows, with_meta=True,
                         **example_kwargs(model, data, split, qa, answers, mc=mc, mc_question=mc_question))


def require_source(data) -> None:
    """What ``data.source`` needs, checked before any work."""
    if data.source == "videos" and not data.manifest:
        raise ConfigError("data.manifest", "is required with data.source=videos: the manifest whose videos "
                          "are decoded (or set data.source=frames and give data.frames)")
    if data.source == "frames" and not data.frames:
        raise ConfigError("data.frames", "is required with data.source=frames: the URI of a committed frames "
                          "feature-set version (see `vidray features ls ROOT`), or set data.source=videos "
                          "to decode data.manifest's videos on the fly")


def source_tags(data) -> dict[str, str]:
    """MLflow tags naming where a run's clips came from."""
    require_source(data)
    if data.source == "videos":
        return {"data.source": "videos", "data.manifest": data.manifest}
    from vidray.feature_store.store import open_version

    return {"data.source": "frames", "feature_set.frames": open_version(data.frames).uri}


def clip_keys(model, data) -> list[tuple[str, int]]:
    """``(video_id, clip_index)`` of every clip the data holds: the frames set's rows, or with
    ``data.source=videos`` the manifest's clips as the sampler cuts them (nothing decoded; a
    caption that starts at or after the video's probed end is skipped there, so not listed)."""
    if data.source == "videos":
        from vidray.data.clips import clip_specs

        mode = video_sampler(model).clip
        rows = read_manifest(data.manifest).select(["video_id", "captions", "duration_s"]).to_pylist()
        return [(r["video_id"], i) for r in rows
                for i, spec in enumerate(clip_specs(r["captions"], r["duration_s"], mode))
                if r["duration_s"] is None or spec["start_s"] < r["duration_s"]]
    from vidray.feature_store import store

    parts = [store.read_parquet(u, ["video_id", "clip_index"]) for u in store.open_version(data.frames).part_uris]
    return [(v, c) for p in parts for v, c in zip(p["video_id"].to_pylist(), p["clip_index"].to_pylist())]


# --- decoding on the fly (data.source=videos) ------------------------------------------------------

def skipped_videos_uri(storage_path: str, run_name: str, split: str) -> str:
    """Where a training run records the videos of ``split`` it could not decode (beside its
    checkpoints: on storage every node reaches)."""

    return storage.join(storage_path, run_name, "skipped_videos", split)


# Videos named one by one in the skip warning; the rest are counted (all are in quarantine.parquet).
NAMED_SKIPS = 10


def video_sampler(model):
    """The frames extractor's settings that cut exactly what ``model`` reads: a frames set extracted
    with them (``frames.num_frames=<model.num_frames> frames.size=<model.image_size>``, uniform,
    one clip per timed caption) holds the same clips and, up to JPEG error, the same pixels."""

    return FramesExtractConfig(num_frames=model.num_frames, size=model.image_size)


def decode_video(row: dict, sampler, overruns: list[dict] | None = None) -> list[dict]:
    """Every clip row of one manifest row with raw ``frames``, cut by the frames extractor itself;
    captions past the video's end are clipped or skipped and recorded in ``overruns``. Raises
    :class:`vidray.data.video.VideoDecodeError` on an unreadable video; storage that does not answer is
    waited for (never a reason to skip a video)."""

    def attempt() -> list[dict]:
        if overruns is not None:
            overruns.clear()  # a retried attempt records them again
        return list(FramesExtractor(sampler).raw_clips(row, overruns))

    return storage.call_with_retries(attempt, row["uri"])


def split_manifest(data, split: str) -> pa.Table:
    """The manifest rows of the videos of ``split`` (the videos :func:`split_videos` keeps)."""
    import pyarrow.compute as pc

    table = read_manifest(data.manifest)
    return table.filter(pc.equal(table["split"], split))


def _video_examples(videos: pa.Table, *, sampler, skipped_to: str, **kwargs) -> Iterator[dict]:
    """Ray Data map: the examples of manifest rows, one output batch per video; a video that
    cannot be decoded, and each caption past a video's end, gets a record under ``skipped_to``
    (as the clip pipeline quarantines)."""
    from vidray.data.quarantine import quarantine_video, write_quarantine
    from vidray.data.video import VideoDecodeError

    for row in videos.to_pylist():
        overruns: list[dict] = []
        try:
            clips = decode_video(row, sampler, overruns)
        except VideoDecodeError as err:
            quarantine_video(skipped_to, row, err)
            continue
        if overruns:
            write_quarantine(skipped_to, row["video_id"], overruns)
        examples = clip_examples(clips, **kwargs)
        if examples:
            yield _columns(examples, **kwargs)


def video_examples_dataset(model, data, split: str, kwargs: dict, skipped_to: str,
                           say: Callable[[str], None] = print):
    """The examples of ``split``'s videos, decoded in Ray Data tasks (a few videos each, in
    parallel) and materialised, so that the skipped videos are known before training starts:
    their records are gathered into ``skipped_to/quarantine.parquet`` and named through ``say``."""
    import ray

    from vidray.data.clips import video_blocks
    from vidray.data.quarantine import gather_quarantine

    if not skipped_to:
        raise ValueError("data.source=videos needs skipped_to: a folder on storage every node reaches, for "
                         "the records of videos that cannot be decoded")
    fs, path = storage.filesystem(skipped_to)
    if fs.exists(path):  # a rerun of the run: records of an earlier attempt would be counted again
        fs.rm(path, recursive=True)
    storage.makedirs(skipped_to)
    videos = split_manifest(data, split)
    parallelism = int(ray.cluster_resources().get("CPU", 1))
    # Parallel across the small blocks of video_blocks; one video per call, whose examples leave as
    # one output batch, so a task holds one video's frames at a time.
    ds = (video_blocks(videos, parallelism)
          .map_batches(_video_examples, batch_format="pyarrow", batch_size=1, num_cpus=1,
                       fn_kwargs={**kwargs, "sampler": video_sampler(model), "skipped_to": skipped_to})
          .materialize())
    warn_skipped(gather_quarantine(skipped_to).to_pylist(), videos.num_rows, split, say,
                 storage.join(skipped_to, "quarantine.parquet"))
    return ds


def read_video_clips(model, data, split: str, say: Callable[[str], None] = print) -> list[dict]:
    """Every clip of ``split``'s videos, decoded in this process (evaluation); unreadable videos are
    skipped and named through ``say``."""
    from vidray.data.quarantine import quarantine_record
    from vidray.data.video import VideoDecodeError

    sampler, clips, skipped = video_sampler(model), [], []
    videos = split_manifest(data, split).to_pylist()
    for row in videos:
        try:
            clips.extend(decode_video(row, sampler))
        except VideoDecodeError as err:
            skipped.append(quarantine_record(row, err))
    warn_skipped(skipped, len(videos), split, say)
    return clips


def warn_skipped(skipped: list[dict], videos: int, split: str, say: Callable[[str], None],
                 records: str = "") -> None:
    """One warning naming each skipped video (up to :data:`NAMED_SKIPS`) and why, with the count;
    captions past a video's end (records with a ``clip_index``) are counted in a note of their own."""
    captions = sum(r["clip_index"] is not None for r in skipped)
    if captions:
        say(f"note: {captions} captions of split {split!r} run past their video's end: clipped or "
            "skipped" + (f"; records in {records}" if records else ""))
    skipped = [r for r in skipped if r["clip_index"] is None]
    if not skipped:
        return
    named = "; ".join(f"{r['video_id']} ({r['error']})" for r in skipped[:NAMED_SKIPS])
    more = f"; and {len(skipped) - NAMED_SKIPS} more" if len(skipped) > NAMED_SKIPS else ""
    say(f"warning: skipped {len(skipped)} of {videos} videos of split {split!r} that cannot be decoded "
        f"(data.source=videos): {named}{more}" + (f"; records in {records}" if records else ""))


def collate(examples: dict, max_text_tokens: int, pad_id: int = 0) -> dict:
    """Pad a batch (numpy dict from Ray Data, or a list of examples) into model tensors."""
    import torch

    if isinstance(examples, list):
        examples = {k: [e[k] for e in examples] for k in ("frames", "text_ids", "answer", "match", "task",
                                                          "vq_codes") if k in examples[0]}
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
    for column in ("match", "task"):  # MC's true/false target; a multi-task row's task index
        if column in examples:
            batch[column] = torch.as_tensor(np.asarray(examples[column], np.int64))
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
