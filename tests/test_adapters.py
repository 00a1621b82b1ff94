"""Dataset adapters: each format -> manifest rows, problems with file + line/path, whole-file errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from vidray import storage
from vidray.data.adapters import (
    ADAPTERS,
    QA_SCHEMA,
    AdapterError,
    adapt,
    label_vocabulary,
    merge_asr_captions,
    per_second_labels,
    qa_uri,
    read_action_segments,
    write_result,
)
from vidray.data.manifest import MANIFEST_SCHEMA, read_manifest


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def rows_by_id(result) -> dict[str, dict]:
    assert result.manifest.schema == MANIFEST_SCHEMA
    return {row["video_id"]: row for row in result.manifest.to_pylist()}


def problems_at(result) -> dict:
    """{(file basename, line or path): reason}"""
    return {(os.path.basename(p.file), p.line): p.reason for p in result.problems}


# ----------------------------------------------------------------------------- webvid

WEBVID_CSV = """videoid,contentUrl,duration,page_idx,page_dir,name
1001,https://x/1001.mp4,PT00H00M11S,1,000001_000050,A dog runs on the beach
1002,https://x/1002.mp4,PT00H00M05S,1,000001_000050,
1003,https://x/1003.mp4,eleven,1,000001_000050,Bad duration
1004,https://x/1004.mp4,,2,000051_000100,  Unknown duration  
1005,https://x/1005.mp4,PT00H01M02.5S,2,000051_000100,"A caption
over two lines"
1001,https://x/1001b.mp4,PT00H00M03S,3,000101_000150,Duplicate id
1006,https://x/1006.mp4,PT00H00M03S,3
1007,https://x/1007.mp4,PT00H00M03S,3,../outside,Escapes the root
"""


def test_webvid_rows_problems_and_uris(tmp_path):
    csv_path = write(tmp_path / "results_2M_val.csv", WEBVID_CSV)
    result = adapt("webvid", csv_path, str(tmp_path / "videos"))

    rows = rows_by_id(result)
    assert list(rows) == ["1001", "1004", "1005"]
    assert rows["1001"]["uri"] == str(tmp_path / "videos" / "000001_000050" / "1001.mp4")
    assert rows["1001"]["duration_s"] == 11.0
    assert rows["1001"]["split"] == "train"
    assert rows["1001"]["captions"] == [{"start": 0.0, "end": 11.0, "text": "A dog runs on the beach"}]
    # Unknown duration: the caption covers the whole video with null times.
    assert rows["1004"]["duration_s"] is None
    assert rows["1004"]["captions"] == [{"start": None, "end": None, "text": "Unknown duration"}]
    assert rows["1005"]["duration_s"] == 62.5
    assert rows["1005"]["captions"][0]["text"] == "A caption\nover two lines"

    problems = problems_at(result)
    assert set(problems) == {("results_2M_val.csv", n) for n in (3, 4, 8, 9, 10)}
    assert "caption (column 'name') is missing" in problems[("results_2M_val.csv", 3)]
    assert "duration 'eleven'" in problems[("results_2M_val.csv", 4)]
    # Line 8 follows the two-line quoted caption of lines 6-7.
    assert "duplicate video id '1001', first seen at 2" in problems[("results_2M_val.csv", 8)]
    assert "expected 6 fields, found 4" in problems[("results_2M_val.csv", 9)]
    assert "page_dir '../outside' must be a relative name" in problems[("results_2M_val.csv", 10)]
    assert all(p.reason.endswith("(row skipped)") and p.file == csv_path for p in result.problems)


def test_webvid_flat_layout_split_and_relative_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "webvid.csv", "videoid,duration,name\n7,PT2S,Short clip\n")
    result = adapt("webvid", "webvid.csv", "videos", split="val", ext="webm", layout="flat")
    (row,) = result.manifest.to_pylist()
    # A relative root becomes absolute: Ray workers run in another directory.
    assert row["uri"] == str(tmp_path / "videos" / "7.webm")
    assert row["split"] == "val"
    assert result.problems == []


def test_webvid_whole_file_problems(tmp_path):
    missing_column = write(tmp_path / "no_name.csv", "videoid,duration,page_dir\n1,PT1S,a\n")
    with pytest.raises(AdapterError, match=r"no_name\.csv: missing required CSV column\(s\) \['name'\]"):
        adapt("webvid", missing_column, "/videos")
    with pytest.raises(AdapterError, match=r"absent\.csv: no such file"):
        adapt("webvid", str(tmp_path / "absent.csv"), "/videos")
    with pytest.raises(AdapterError, match="empty file"):
        adapt("webvid", write(tmp_path / "empty.csv", ""), "/videos")
    with pytest.raises(AdapterError, match="layout='nested'"):
        adapt("webvid", missing_column, "/videos", layout="nested")


# ----------------------------------------------------------------------------- howto100m


def test_howto100m_merges_asr_and_reports_bad_arrays(tmp_path):
    raw = {
        "vidA": {
            "start": [10.0, 0.0, 2.0, 10.0, 20.0, 30.0],
            "end": [12.0, 5.0, 7.0, 12.0, 25.0, 31.0],
            "text": ["add salt", "how to  cook", "how to cook", "add salt", "stir", "and stir"],
        },
        "vidB": {"start": [0.0, 1.0], "end": [1.0], "text": ["a", "b"]},
        "vidC": {"start": [0.0, "3", 4.0, 9.0], "end": [1.0, 4.0, 2.0, 10.0],
                 "text": [5, "ok", "backwards", "fine"]},
        "vid.D": ["not", "an", "object"],
    }
    path = write(tmp_path / "raw_caption.json", json.dumps(raw))
    result = adapt("howto100m", path, "s3://bucket/howto/")

    rows = rows_by_id(result)
    assert list(rows) == ["vidA", "vidC"]
    assert rows["vidA"]["uri"] == "s3://bucket/howto/vidA.mp4"
    assert rows["vidA"]["duration_s"] is None
    # Overlapping identical text -> one segment spanning both; exact duplicate -> one.
    assert rows["vidA"]["captions"] == [
        {"start": 0.0, "end": 7.0, "text": "how to cook"},
        {"start": 10.0, "end": 12.0, "text": "add salt"},
        {"start": 20.0, "end": 25.0, "text": "stir"},
        {"start": 30.0, "end": 31.0, "text": "and stir"},
    ]
    assert rows["vidC"]["captions"] == [{"start": 9.0, "end": 10.0, "text": "fine"}]

    problems = problems_at(result)
    assert set(problems) == {("raw_caption.json", p) for p in
                             ("vidB", "vidC.text[0]", "vidC.start[1]", "vidC.end[2]", '["vid.D"]')}
    assert "unequal lengths {'start': 2, 'end': 1, 'text': 2}" in problems[("raw_caption.json", "vidB")]
    assert problems[("raw_caption.json", "vidB")].endswith("(video skipped)")
    assert "text must be a string, got int" in problems[("raw_caption.json", "vidC.text[0]")]
    assert "start must be a number, got str" in problems[("raw_caption.json", "vidC.start[1]")]
    assert "end 2.0 is before start 4.0" in problems[("raw_caption.json", "vidC.end[2]")]
    assert problems[("raw_caption.json", "vidC.end[2]")].endswith("(segment skipped)")


def test_merge_asr_captions_rule():
    merged = merge_asr_captions([
        {"start": 5.0, "end": 6.0, "text": "again"},  # touches the first "again": a phrase said twice
        {"start": 4.0, "end": 5.0, "text": "again"},
        {"start": 4.5, "end": 5.5, "text": "other words"},  # overlaps, different text: kept
        {"start": 8.0, "end": 8.0, "text": "blip"},
        {"start": 8.0, "end": 8.0, "text": "blip"},  # exact zero-length duplicate
        {"start": 1.0, "end": 3.0, "text": "long"},
        {"start": 1.5, "end": 2.0, "text": "long"},  # inside the first: end stays 3.0
    ])
    assert merged == [
        {"start": 1.0, "end": 3.0, "text": "long"},
        {"start": 4.0, "end": 5.0, "text": "again"},
        {"start": 4.5, "end": 5.5, "text": "other words"},
        {"start": 5.0, "end": 6.0, "text": "again"},
        {"start": 8.0, "end": 8.0, "text": "blip"},
    ]


# ----------------------------------------------------------------------------- msrvtt

MSRVTT = {
    "info": {"year": 2016},
    "videos": [
        {"video_id": "video0", "split": "train", "start time": 137.72, "end time": 149.44, "id": 0},
        {"video_id": "video1", "split": "validate", "id": 1},
        {"video_id": "video2", "split": "test", "start time": 0, "end time": 10, "id": 2},
        {"video_id": "video3", "split": "test", "id": 3},
        {"video_id": "video4", "split": "dev", "id": 4},
        {"video_id": "video0", "split": "test", "id": 5},
    ],
    "sentences": [
        {"video_id": "video0", "caption": "a car drives", "sen_id": 0},
        {"video_id": "video0", "caption": "a red car on a road", "sen_id": 1},
        {"video_id": "video1", "caption": "a man cooks", "sen_id": 2},
        {"video_id": "video2", "caption": "a woman sings", "sen_id": 3},
        {"video_id": "video2", "caption": "someone is singing", "sen_id": 4},
        {"video_id": "video4", "caption": "dropped with its video", "sen_id": 5},
        {"video_id": "video9", "caption": "no such video", "sen_id": 6},
        {"video_id": "video3", "sen_id": 7},
        "not an object",
    ],
}


def test_msrvtt_splits_captions_and_problems(tmp_path):
    path = write(tmp_path / "MSRVTT_data.json", json.dumps(MSRVTT))
    result = adapt("msrvtt", path, str(tmp_path / "videos"))

    rows = rows_by_id(result)
    assert {vid: row["split"] for vid, row in rows.items()} == {
        "video0": "train", "video1": "val", "video2": "test", "video3": "test"}
    assert rows["video0"]["uri"] == str(tmp_path / "videos" / "video0.mp4")
    assert rows["video0"]["duration_s"] == pytest.approx(11.72)
    assert rows["video1"]["duration_s"] is None
    assert rows["video0"]["captions"] == [{"start": None, "end": None, "text": "a car drives"},
                                          {"start": None, "end": None, "text": "a red car on a road"}]
    assert rows["video3"]["captions"] == []

    problems = problems_at(result)
    assert set(problems) == {("MSRVTT_data.json", p) for p in
                             ("videos[4]", "videos[5]", "sentences[6]", "sentences[7]", "sentences[8]")}
    assert "split 'dev' is not one of" in problems[("MSRVTT_data.json", "videos[4]")]
    assert "duplicate video id 'video0', first seen at videos[0]" in problems[("MSRVTT_data.json", "videos[5]")]
    assert "video 'video9' is not in 'videos'" in problems[("MSRVTT_data.json", "sentences[6]")]
    assert "caption is missing" in problems[("MSRVTT_data.json", "sentences[7]")]
    assert "expected an object" in problems[("MSRVTT_data.json", "sentences[8]")]


def test_msrvtt_1k_test_csv(tmp_path):
    path = write(tmp_path / "MSRVTT_data.json", json.dumps(MSRVTT))
    test_csv = write(tmp_path / "MSRVTT_JSFUSION_test.csv",
                     "key,vid_key,video_id,sentence\n"
                     "ret0,msr2,video2,a woman is singing on stage\n"
                     "ret1,msr9,video9,unknown video\n"
                     "ret2,msr2,video2,second sentence for the same video\n"
                     "ret3,msr1,video1,\n")
    result = adapt("msrvtt", path, "/videos", test_csv=test_csv)

    rows = rows_by_id(result)
    assert rows["video2"]["split"] == "test"
    assert rows["video2"]["captions"] == [{"start": None, "end": None, "text": "a woman is singing on stage"}]
    assert rows["video3"]["split"] == "train"  # an official test video outside the 1k -> train
    assert rows["video1"]["split"] == "val"
    problems = problems_at(result)
    assert "video 'video9' is not in the MSR-VTT annotations" in problems[("MSRVTT_JSFUSION_test.csv", 3)]
    assert "duplicate video id 'video2', first seen at 2" in problems[("MSRVTT_JSFUSION_test.csv", 4)]
    assert "sentence is missing" in problems[("MSRVTT_JSFUSION_test.csv", 5)]

    only_test = adapt("msrvtt", path, "/videos", split="test", test_csv=test_csv)
    assert only_test.manifest.column("video_id").to_pylist() == ["video2"]


def test_msrvtt_whole_file_problems(tmp_path):
    with pytest.raises(AdapterError, match=r"broken\.json: not valid JSON"):
        adapt("msrvtt", write(tmp_path / "broken.json", '{"videos": ['), "/videos")
    with pytest.raises(AdapterError, match=r"top-level key 'sentences' must be a list, found missing"):
        adapt("msrvtt", write(tmp_path / "no_sentences.json", '{"videos": []}'), "/videos")


# ----------------------------------------------------------------------------- youcook2

YOUCOOK2 = {
    "database": {
        "abc": {
            "subset": "training", "duration": 241.62, "recipe_type": "113",
            "annotations": [
                {"segment": [90, 102], "id": 0, "sentence": "grill the tomatoes in a pan"},
                {"segment": [114, 127], "id": 1, "sentence": "add oil to a pan"},
                {"segment": [5], "id": 2, "sentence": "one number"},
                {"segment": [130, 140], "id": 3},
                {"segment": [150, 145], "id": 4, "sentence": "backwards"},
                {"segment": ["1", 2], "id": 5, "sentence": "string time"},
            ],
        },
        "def": {"subset": "validation", "duration": 100, "annotations": [
            {"segment": [0, 10], "sentence": "cut the bread"}]},
        "ghi": {"subset": "holdout", "annotations": []},
        "jkl": {"subset": "training", "duration": "long", "annotations": []},
    }
}


def test_youcook2_timestamped_captions_and_paths(tmp_path):
    path = write(tmp_path / "youcookii_annotations_trainval.json", json.dumps(YOUCOOK2))
    result = adapt("youcook2", path, str(tmp_path))

    rows = rows_by_id(result)
    assert {vid: row["split"] for vid, row in rows.items()} == {"abc": "train", "def": "val"}
    assert rows["abc"]["uri"] == str(tmp_path / "abc.mp4")
    assert rows["abc"]["duration_s"] == 241.62
    assert rows["abc"]["captions"] == [
        {"start": 90.0, "end": 102.0, "text": "grill the tomatoes in a pan"},
        {"start": 114.0, "end": 127.0, "text": "add oil to a pan"},
    ]
    name = "youcookii_annotations_trainval.json"
    problems = problems_at(result)
    assert set(problems) == {(name, f"database.abc.annotations[{i}]") for i in (2, 3, 4, 5)} | {
        (name, "database.ghi"), (name, "database.jkl")}
    assert "segment must be a list [start, end], got [5]" in problems[(name, "database.abc.annotations[2]")]
    assert "sentence is missing (caption skipped)" in problems[(name, "database.abc.annotations[3]")]
    assert "segment end 145.0 is before segment start 150.0" in problems[(name, "database.abc.annotations[4]")]
    assert "segment start must be a number, got str" in problems[(name, "database.abc.annotations[5]")]
    assert "subset 'holdout' is not one of" in problems[(name, "database.ghi")]
    assert "duration must be a number" in problems[(name, "database.jkl")]
    assert problems[(name, "database.jkl")].endswith("(video skipped)")

    val = adapt("youcook2", path, str(tmp_path), split="val")
    assert val.manifest.column("video_id").to_pylist() == ["def"]


# ----------------------------------------------------------------------------- qa / mc

QA_JSONL = "\n".join([
    '{"video": "v1", "question": "what colour is the circle?", "answer": "red"}',
    '{"video": "v1.mp4", "question": "what moves up?", "answer": "square"}',
    '{"video": "v2", "question": "how many shapes?", "answer": 3}',
    '{"video": "v3", "question": "trunc',
    '',
    '{"video": ["v4"], "question": "wrong type", "answer": "x"}',
    '{"video": "v5", "answer": "no question"}',
    '{"video": "v6", "question": "boolean answer?", "answer": true}',
    '["not", "an", "object"]',
]) + "\n"


def test_qa_unique_videos_and_questions(tmp_path):
    path = write(tmp_path / "qa_train.jsonl", QA_JSONL)
    result = adapt("qa", path, "s3://bucket/videos")

    assert result.manifest.to_pylist() == [
        {"video_id": vid, "uri": f"s3://bucket/videos/{vid}.mp4", "split": "train", "duration_s": None,
         "fps": None, "width": None, "height": None, "captions": []} for vid in ("v1", "v2")]
    assert result.qa.schema == QA_SCHEMA
    assert result.qa.to_pylist() == [
        {"video_id": "v1", "question": "what colour is the circle?", "options": None, "answer": "red"},
        {"video_id": "v1", "question": "what moves up?", "options": None, "answer": "square"},
        {"video_id": "v2", "question": "how many shapes?", "options": None, "answer": "3"},
    ]
    problems = problems_at(result)
    assert set(problems) == {("qa_train.jsonl", n) for n in (4, 6, 7, 8, 9)}
    assert "not valid JSON" in problems[("qa_train.jsonl", 4)]
    assert "video must be a string, got list" in problems[("qa_train.jsonl", 6)]
    assert "question is missing" in problems[("qa_train.jsonl", 7)]
    assert "answer must be a string, got bool" in problems[("qa_train.jsonl", 8)]
    assert "expected a JSON object, got list" in problems[("qa_train.jsonl", 9)]


MC_JSONL = "\n".join([
    '{"video": "v1", "question": "which shape moves left?", "options": ["circle", "square", "triangle"], "answer": 1}',
    '{"video": "v2", "question": "which colour?", "options": [" red ", "green"], "answer": "red"}',
    '{"video": "v1", "question": "index too big", "options": ["a", "b"], "answer": 2}',
    '{"video": "v3", "question": "text not an option", "options": ["a", "b"], "answer": "c"}',
    '{"video": "v3", "question": "digit string", "options": ["a", "b"], "answer": "1"}',
    '{"video": "v3", "question": "repeated options", "options": ["a", "a"], "answer": 0}',
    '{"video": "v3", "question": "options not a list", "options": "a,b", "answer": 0}',
    '{"video": "v3", "question": "numeric option", "options": ["a", 2], "answer": 0}',
]) + "\n"


def test_mc_answer_normalised_to_option_text(tmp_path):
    path = write(tmp_path / "mc_test.jsonl", MC_JSONL)
    result = adapt("mc", path, "/videos", split="test")

    assert result.manifest.column("video_id").to_pylist() == ["v1", "v2"]
    assert set(result.manifest.column("split").to_pylist()) == {"test"}
    assert result.qa.to_pylist() == [
        {"video_id": "v1", "question": "which shape moves left?",
         "options": ["circle", "square", "triangle"], "answer": "square"},
        {"video_id": "v2", "question": "which colour?", "options": ["red", "green"], "answer": "red"},
    ]
    problems = problems_at(result)
    assert set(problems) == {("mc_test.jsonl", n) for n in range(3, 9)}
    assert "answer index 2 is out of range for 2 options" in problems[("mc_test.jsonl", 3)]
    assert "answer 'c' is not one of the options" in problems[("mc_test.jsonl", 4)]
    assert "answer '1' is not one of the options" in problems[("mc_test.jsonl", 5)]
    assert "options repeat a choice" in problems[("mc_test.jsonl", 6)]
    assert "options must be a list of strings, got str" in problems[("mc_test.jsonl", 7)]
    assert "options[1] must be a string, got int" in problems[("mc_test.jsonl", 8)]


def test_mc_one_based_index(tmp_path):
    path = write(tmp_path / "mc.jsonl",
                 '{"video": "v1", "question": "q", "options": ["a", "b", "c"], "answer": 3}\n'
                 '{"video": "v1", "question": "q0", "options": ["a", "b", "c"], "answer": 0}\n')
    result = adapt("mc", path, "/videos", index_base=1)
    assert result.qa.column("answer").to_pylist() == ["c"]
    assert [(p.line, "out of range" in p.reason) for p in result.problems] == [(2, True)]


# ----------------------------------------------------------------------------- entry point


def test_registry_and_entry_point_errors(tmp_path):
    assert list(ADAPTERS) == ["webvid", "howto100m", "msrvtt", "youcook2", "qa", "mc"]
    with pytest.raises(AdapterError, match="unknown annotation format 'coin'; known formats: webvid, howto100m"):
        adapt("coin", "COIN.json", "/videos")
    with pytest.raises(AdapterError, match=r"format 'qa' has no option\(s\) \['layout'\]; its options: none"):
        adapt("qa", "qa.jsonl", "/videos", layout="flat")
    with pytest.raises(AdapterError, match=r"format 'msrvtt' has no option\(s\) \['test_cvs'\]; .*test_csv"):
        adapt("msrvtt", "MSRVTT_data.json", "/videos", test_cvs="x.csv")
    with pytest.raises(AdapterError, match="split 'validate' is not one of"):
        adapt("msrvtt", "MSRVTT_data.json", "/videos", split="validate")


def test_write_result_round_trip(tmp_path):
    qa = adapt("qa", write(tmp_path / "qa.jsonl", QA_JSONL), str(tmp_path / "videos"))
    out = str(tmp_path / "out" / "manifest.parquet")
    assert write_result(qa, out) == [out, str(tmp_path / "out" / "manifest.qa.parquet")]
    assert read_manifest(out).equals(qa.manifest)
    assert pq.read_table(qa_uri(out)).equals(qa.qa)


# ----------------------------------------------------------------------------- object storage


def test_annotations_on_s3(s3_uri):
    annotations = storage.join(s3_uri, "webvid", "results_2M_val.csv")
    storage.write_bytes(annotations, WEBVID_CSV.encode())
    storage.write_bytes(storage.join(s3_uri, "qa.jsonl"), QA_JSONL.encode())

    result = adapt("webvid", annotations, storage.join(s3_uri, "videos"))
    assert result.manifest.column("video_id").to_pylist() == ["1001", "1004", "1005"]
    assert result.manifest.column("uri")[0].as_py() == f"{s3_uri}/videos/000001_000050/1001.mp4"
    assert {(p.file, p.line) for p in result.problems} == {(annotations, n) for n in (3, 4, 8, 9, 10)}

    qa = adapt("qa", storage.join(s3_uri, "qa.jsonl"), storage.join(s3_uri, "videos"))
    out = storage.join(s3_uri, "manifests", "qa.parquet")
    write_result(qa, out)
    assert read_manifest(out).equals(qa.manifest)

    with pytest.raises(AdapterError, match="missing.json: no such file"):
        adapt("youcook2", storage.join(s3_uri, "missing.json"), "/videos")


# ----------------------------------------------------------------------------- action segments (COIN)

COIN = {
    "database": {
        "vidA": {"subset": "training", "duration": 9.5, "recipe_type": 3, "annotation": [
            {"id": "12", "segment": [4.0, 7.5], "label": "pour water"},
            {"id": "11", "segment": [0.5, 3.0], "label": "open lid"},
            {"id": "11", "segment": [5]},                                    # malformed
            {"id": "13", "segment": [7.5, 9.0]},                             # no label
            {"id": "12", "segment": [8.0, 6.0], "label": "pour water"},      # end before start
            {"id": "12", "segment": ["1", 2.0], "label": "pour water"},      # string time
        ]},
        "vidB": {"subset": "testing", "duration": 4, "annotation": [
            {"id": "13", "segment": [1, 4], "label": "close lid"}]},
        "vidC": {"subset": "holdout", "annotation": []},
        "vidD": {"subset": "training", "annotation": {"segment": [0, 1]}},
        "vidE": {"subset": "validation", "annotation": [["not", "an", "object"]]},
    }
}


def test_read_action_segments_sorted_with_problems(tmp_path):
    path = write(tmp_path / "COIN.json", json.dumps(COIN))
    found = read_action_segments(path)

    assert found.segments == {
        "vidA": [{"start": 0.5, "end": 3.0, "label": "open lid"},
                 {"start": 4.0, "end": 7.5, "label": "pour water"}],
        "vidB": [{"start": 1.0, "end": 4.0, "label": "close lid"}],
        "vidE": [],  # every segment was malformed: the video stays, all background
    }
    assert found.splits == {"vidA": "train", "vidB": "test", "vidE": "val"}
    assert found.durations == {"vidA": 9.5, "vidB": 4.0, "vidE": None}
    problems = {path: reason for (name, path), reason in problems_at(found).items() if name == "COIN.json"}
    assert len(problems) == len(found.problems)
    assert set(problems) == {f"database.vidA.annotation[{j}]" for j in (2, 3, 4, 5)} | {
        "database.vidC", "database.vidD", "database.vidE.annotation[0]"}
    assert "segment must be a list [start, end], got [5]" in problems["database.vidA.annotation[2]"]
    assert problems["database.vidA.annotation[3]"] == "label is missing (segment skipped)"
    assert "segment end 6.0 is before segment start 8.0" in problems["database.vidA.annotation[4]"]
    assert "segment start must be a number, got str" in problems["database.vidA.annotation[5]"]
    assert "subset 'holdout' is not one of" in problems["database.vidC"]
    assert problems["database.vidD"].endswith("(video skipped)")
    assert problems["database.vidE.annotation[0]"].endswith("(segment skipped)")

    assert list(read_action_segments(path, split="test").segments) == ["vidB"]
    assert label_vocabulary(found.segments) == {"close lid": 0, "open lid": 1, "pour water": 2}
    with pytest.raises(AdapterError, match="split 'dev'"):
        read_action_segments(path, split="dev")
    with pytest.raises(AdapterError, match="top-level key 'database'"):
        read_action_segments(write(tmp_path / "empty.json", "{}"))


def naive_per_second(segments, num_seconds, classes, background=-100):
    """The rule spelled out: the last segment (by start, end, label) holding the second's middle."""
    out = []
    for second in range(num_seconds):
        middle = second + 0.5
        holding = [seg for seg in segments if seg["start"] <= middle < seg["end"]]
        last = max(holding, key=lambda seg: (seg["start"], seg["end"], seg["label"]), default=None)
        out.append(background if last is None else classes[last["label"]])
    return out


def test_per_second_labels_match_naive_loop():
    rng = np.random.default_rng(0)
    classes = {"a": 0, "b": 1, "c": 2}
    for _ in range(200):
        # Half-second grid times hit the s + 0.5 boundaries exactly; some segments overlap.
        times = np.sort(rng.integers(0, 24, size=(int(rng.integers(0, 5)), 2)) / 2, axis=1)
        segments = [{"start": float(a), "end": float(b), "label": str(rng.choice(list(classes)))}
                    for a, b in times]
        num_seconds = int(rng.integers(0, 14))
        labels = per_second_labels(segments, num_seconds, classes)
        assert labels.dtype == np.int64 and labels.shape == (num_seconds,)
        assert labels.tolist() == naive_per_second(segments, num_seconds, classes)


def test_per_second_labels_gaps_boundaries_and_unknown_labels():
    classes = {"open lid": 0, "pour water": 1}
    segments = [{"start": 0.2, "end": 2.5, "label": "open lid"},     # middles 0.5, 1.5
                {"start": 2.5, "end": 3.4, "label": "pour water"},   # 2.5: the later segment
                {"start": 6.0, "end": 7.6, "label": "pour water"}]   # 6.5, 7.5
    labels = per_second_labels(segments, 9, classes)
    assert labels.tolist() == [0, 0, 1, -100, -100, -100, 1, 1, -100]
    assert per_second_labels(segments, 9, classes, background=-1).tolist()[3:6] == [-1, -1, -1]
    assert per_second_labels([], 3, classes).tolist() == [-100, -100, -100]
    with pytest.raises(ValueError, match="'stir'"):
        per_second_labels(segments + [{"start": 20.0, "end": 21.0, "label": "stir"}], 9, classes)


def test_synth_coin_json_reads_back(tmp_path):
    """vidray synth's coin.json (built from plans, no encoding) reads back with no problems."""
    from vidray.data.synth import captions, coin_json, plan_video

    plans = [plan_video(3, i, 2.0, 6.0) for i in range(3)]
    path = tmp_path / "coin.json"
    path.write_bytes(coin_json(plans, ["train", "val", "test"]))
    found = read_action_segments(str(path))
    assert found.problems == []
    assert found.splits == {p.video_id: s for p, s in zip(plans, ["train", "val", "test"])}
    for plan in plans:
        spans = [(c["start"], c["end"]) for c in captions(plan)]
        assert [(s["start"], s["end"]) for s in found.segments[plan.video_id]] == spans
        labels = per_second_labels(found.segments[plan.video_id], int(plan.duration_s),
                                   label_vocabulary(found.segments))
        assert (labels >= 0).all(), "events tile the video: no second is background"
