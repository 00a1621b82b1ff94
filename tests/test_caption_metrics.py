"""caption_metrics: COCO-convention BLEU/METEOR/ROUGE-L/CIDEr on PTB-tokenized captions.

METEOR starts a JVM that loads a 60 MB paraphrase table (~6 s), so only the tests about METEOR
itself run it; the others simulate an absent JRE (`no_jre`) to keep this file fast.

The PTB tokenizer (vidray.eval.ptb_tokenizer) is checked against the output of the CoreNLP jar that
pycocoevalcap runs, recorded in tests/data/ptb_captions.txt (its header says how it was made),
and against the jar itself where Java and pycocoevalcap's jar are installed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vidray.eval import captioning as cm
from vidray.eval.captioning import caption_metrics
from vidray.eval.ptb_tokenizer import ptb_tokenize_lines, tokenize_captions

FIXTURE = Path(__file__).parent / "data" / "ptb_captions.txt"

SENTENCE = "A man is playing a guitar on stage."

# Three clips; CLOSE paraphrases each reference set, FAR only shares a word or two with it.
CORPUS_REFS = {
    "v1": ["a man is playing a guitar", "a person plays the guitar on stage"],
    "v2": ["a woman is cooking pasta in a kitchen", "someone cooks noodles in the kitchen"],
    "v3": ["a dog runs across a grassy field", "a brown dog is running on the grass"],
}
CLOSE = {
    "v1": "a man is playing the guitar",
    "v2": "a woman is cooking in a kitchen",
    "v3": "a dog is running on the grass",
}
FAR = {"v1": "a person is on stage", "v2": "a woman is in a room", "v3": "an animal is outside"}


@pytest.fixture
def no_jre(monkeypatch):
    """Simulate a machine without a Java runtime: `shutil.which("java")` finds nothing."""
    monkeypatch.setattr(cm.shutil, "which", lambda name, *args, **kwargs: None)


def naive_lcs(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by brute force: the longest subsequence of `a` found in `b`."""

    def is_subsequence(seq: tuple[str, ...], of: list[str]) -> bool:
        remaining = iter(of)
        return all(token in remaining for token in seq)

    for length in range(len(a), 0, -1):
        if any(is_subsequence(combo, b) for combo in itertools.combinations(a, length)):
            return length
    return 0


def naive_rouge_l(candidate: str, refs: list[str], beta: float = 1.2) -> float:
    """ROUGE-L F-measure as COCO defines it: best precision and best recall over references."""
    cand = candidate.split()
    precision = max(naive_lcs(cand, ref.split()) / len(cand) for ref in refs)
    recall = max(naive_lcs(cand, ref.split()) / len(ref.split()) for ref in refs)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def read_fixture() -> tuple[list[str], list[str]]:
    """(captions, the jar's output line for each) from tests/data/ptb_captions.txt."""
    captions, jar_lines = [], []
    for line in FIXTURE.read_text(encoding="utf-8").split("\n"):
        if line.startswith("caption: "):
            captions.append(line[len("caption: "):])
        elif line.startswith("ptb: "):
            jar_lines.append(line[len("ptb: "):])
    assert len(captions) == len(jar_lines) == 300
    return captions, jar_lines


def fixture_scenes() -> tuple[dict[str, str], dict[str, list[str]]]:
    """The fixture's 60 scenes: the first caption of each group of five is the prediction."""
    captions, _ = read_fixture()
    keys = [f"scene{k:02d}" for k in range(len(captions) // 5)]
    predictions = {key: captions[5 * k] for k, key in enumerate(keys)}
    references = {key: captions[5 * k + 1 : 5 * k + 5] for k, key in enumerate(keys)}
    return predictions, references


def mismatches(captions: list[str], expected_lines: list[str]) -> list[str]:
    ours = [" ".join(tokens) for tokens in ptb_tokenize_lines(captions)]
    assert len(ours) == len(expected_lines)
    return [f"line {i}: {c!r}: jar {e!r}, ours {o!r}"
            for i, (c, e, o) in enumerate(zip(captions, expected_lines, ours)) if e != o]


def test_ptb_tokenizer_splits_as_the_jar_does():
    # Contractions and possessives split off, hyphenated words kept, brackets spelled out (and,
    # lower-cased by -lowerCase, not in pycocoevalcap's punctuation list), quotes in LaTeX style.
    assert ptb_tokenize_lines(["A man's ice-cream isn't \"cheap\" (or cold)..."]) == [
        ["a", "man", "'s", "ice-cream", "is", "n't", "``", "cheap", "''", "-lrb-", "or", "cold", "-rrb-", "..."]
    ]
    assert ptb_tokenize_lines(["He cannot go, he's gonna stay.", "Mr. Smith paid $5.50 at 9 a.m."]) == [
        ["he", "can", "not", "go", ",", "he", "'s", "gon", "na", "stay", "."],
        ["mr.", "smith", "paid", "$", "5.50", "at", "9", "a.m."],
    ]
    # pycocoevalcap then drops the tokens on its punctuation list, and only those ("??" stays);
    # a newline inside a caption is a space.
    assert tokenize_captions(["  A Man, playing-guitar!\n Isn't it?? ", "The dog\u2019s \u201cball\u201d\u2026 (red)", "?!.", "..."]) == [
        "a man playing-guitar is n't it ??",
        "the dog 's ball -lrb- red -rrb-",
        "?!",
        "",
    ]


def test_ptb_tokenizer_equals_the_recorded_jar_output_on_every_fixture_line():
    captions, jar_lines = read_fixture()
    assert mismatches(captions, jar_lines) == []


def pycocoevalcap_jar() -> Path | None:
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError:
        return None
    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    return jar if jar.exists() else None


def test_ptb_tokenizer_equals_the_jar_run_now(tmp_path):
    jar = pycocoevalcap_jar()
    if shutil.which("java") is None or jar is None:
        pytest.skip("needs java on PATH and pycocoevalcap's stanford-corenlp-3.4.1.jar "
                    "(the recorded output in tests/data/ptb_captions.txt is checked without them)")
    captions, jar_lines = read_fixture()
    corpus = tmp_path / "captions.txt"
    corpus.write_bytes("\n".join(captions).encode("utf-8"))  # as pycocoevalcap writes its file
    run = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                          "-preserveLines", "-lowerCase", str(corpus)], capture_output=True, timeout=300, check=True)
    live_lines = run.stdout.decode("utf-8").split("\n")
    assert live_lines == jar_lines  # the fixture still says what this jar prints
    assert mismatches(captions, live_lines) == []

    # pycocoevalcap's own wrapper (jar + punctuation removal) on the scenes, as COCOEvalCap calls it.
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _, references = fixture_scenes()
    try:
        official_refs = PTBTokenizer().tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    except PermissionError:  # it writes its temporary file next to the jar
        pytest.skip("pycocoevalcap's tokenizer folder is not writable; the jar's lines were checked")
    ours = iter(tokenize_captions([c for refs in references.values() for c in refs]))
    assert official_refs == {key: [next(ours) for _ in refs] for key, refs in references.items()}


# pycocoevalcap 1.2's own pipeline on the fixture's 60 scenes (what COCOEvalCap.evaluate does):
# its PTBTokenizer (the Java jar) on the references and on the predictions, then Bleu(4), Meteor,
# Rouge and Cider on what it returned. Recorded on 2026-12-06 with OpenJDK 17.0.15.
PYCOCOEVALCAP_SCORES = {
    "BLEU-3": 0.33970592973776687,
    "BLEU-4": 0.22873401880744706,
    "METEOR": 0.33207861631871705,
    "ROUGE-L": 0.5457365027956385,
    "CIDEr": 1.3586831627770188,
}


def test_scores_equal_pycocoevalcap_on_punctuated_captions():
    predictions, references = fixture_scenes()
    metrics, skipped = caption_metrics(predictions, references)
    expected = dict(PYCOCOEVALCAP_SCORES)
    if shutil.which("java") is None:
        assert "METEOR" in skipped
        del expected["METEOR"]
    assert metrics == pytest.approx(expected, rel=1e-12, abs=0)


def test_identical_caption_scores_perfectly_and_meteor_runs_when_java_present():
    metrics, skipped = caption_metrics({"v": SENTENCE}, {"v": [SENTENCE.lower().rstrip(".")]})
    assert metrics["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["BLEU-3"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ROUGE-L"] == pytest.approx(1.0)
    if shutil.which("java"):
        assert "METEOR" not in skipped
        assert metrics["METEOR"] == pytest.approx(1.0, abs=1e-3)
    else:
        assert "METEOR" in skipped


def test_rouge_l_matches_naive_lcs_f_measure(no_jre):
    predictions = {"a": "A cat sits on the mat.", "b": "a dog runs"}
    references = {
        "a": ["the cat is on the mat", "a dog sits outside"],
        "b": ["a brown dog runs across the field"],
    }
    # By hand: "a" has P = R = 4/6 (LCS "cat on the mat"), so F = 2/3; "b" has P = 1, R = 3/7.
    assert naive_rouge_l("a cat sits on the mat", references["a"]) == pytest.approx(2 / 3)
    expected_b = (1 + 1.44) * 1.0 * (3 / 7) / (3 / 7 + 1.44 * 1.0)
    assert naive_rouge_l("a dog runs", references["b"]) == pytest.approx(expected_b)

    metrics, _ = caption_metrics(predictions, references)
    expected = (naive_rouge_l("a cat sits on the mat", references["a"]) + expected_b) / 2
    assert metrics["ROUGE-L"] == pytest.approx(expected, rel=1e-9)


def test_disjoint_prediction_has_zero_bleu(no_jre):
    metrics, _ = caption_metrics({"v": "zebra xylophone quantum orbit"}, {"v": ["a man plays the guitar"]})
    assert metrics["BLEU-4"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["BLEU-3"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["ROUGE-L"] == 0.0


def test_cider_ranks_closer_predictions_higher(no_jre):
    close, _ = caption_metrics(CLOSE, CORPUS_REFS)
    far, _ = caption_metrics(FAR, CORPUS_REFS)
    assert close["CIDEr"] > 2 * far["CIDEr"]
    for name in ("BLEU-3", "BLEU-4", "ROUGE-L"):
        assert close[name] > far[name], name


def test_punctuation_and_case_do_not_change_scores(no_jre):
    shouted = {key: caption.upper().replace(" is ", ", is ") + "!" for key, caption in CLOSE.items()}
    assert caption_metrics(shouted, CORPUS_REFS) == caption_metrics(CLOSE, CORPUS_REFS)


def test_references_without_predictions_are_ignored(no_jre):
    subset = {"v1": CLOSE["v1"], "v2": CLOSE["v2"]}
    two_refs = {key: CORPUS_REFS[key] for key in subset}
    assert caption_metrics(subset, CORPUS_REFS) == caption_metrics(subset, two_refs)


@pytest.mark.parametrize(
    ("predictions", "references", "match"),
    [
        ({}, {"v1": ["a caption"]}, "empty"),
        ({"v1": "a cat", "v9": "a dog"}, {"v1": ["a cat"]}, "'v9'"),
        ({"v1": "a cat", "v2": "a dog"}, {"v1": ["a cat"], "v2": []}, "'v2'"),
        ({"v1": "a cat"}, {"v1": "a cat"}, "'v1'"),
    ],
    ids=["no-predictions", "missing-id", "empty-reference-list", "bare-string-reference"],
)
def test_invalid_inputs_raise_naming_the_id(predictions, references, match):
    with pytest.raises(ValueError, match=match):
        caption_metrics(predictions, references)


def test_meteor_skipped_without_java(no_jre):
    metrics, skipped = caption_metrics({"v": SENTENCE}, {"v": [SENTENCE]})
    assert "METEOR" not in metrics
    assert skipped == {"METEOR": cm.JAVA_MISSING_REASON}
    assert "java" in skipped["METEOR"] and "apt-get install" in skipped["METEOR"]
    assert set(metrics) == {"BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}


def test_meteor_subprocess_failure_is_reported_not_raised(tmp_path, monkeypatch):
    # A broken JRE: a `java` first on PATH that exits at once without reading or answering.
    fake_java = tmp_path / "java"
    fake_java.write_text("#!/bin/sh\necho 'Error: corrupt JRE' >&2\nexit 1\n")
    fake_java.chmod(fake_java.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")

    metrics, skipped = caption_metrics({"v": SENTENCE}, {"v": [SENTENCE]})
    assert "METEOR" not in metrics
    assert skipped["METEOR"].startswith("METEOR subprocess failed")
    assert "corrupt JRE" in skipped["METEOR"]  # java's own complaint is passed on
    assert metrics["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_hung_meteor_is_killed_and_reported(tmp_path, monkeypatch):
    # A JVM that never answers: the watchdog must kill it instead of blocking evaluation forever.
    fake_java = tmp_path / "java"
    fake_java.write_text("#!/bin/sh\nexec sleep 60\n")
    fake_java.chmod(fake_java.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(cm, "METEOR_TIMEOUT_S", 0.5)

    metrics, skipped = caption_metrics({"v": SENTENCE}, {"v": [SENTENCE]})
    assert "METEOR" not in metrics
    assert skipped["METEOR"].startswith("METEOR subprocess failed")
    assert "killed" in skipped["METEOR"]
