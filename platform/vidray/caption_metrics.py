"""Captioning metrics with the COCO caption evaluation conventions (pycocoevalcap scorers).

`caption_metrics` reports corpus-level BLEU-3, BLEU-4, METEOR, ROUGE-L and CIDEr exactly as the
COCO toolkit does: BLEU over the whole corpus with the "closest" reference length, METEOR from
the jar's aggregate statistics, ROUGE-L (beta = 1.2) and CIDEr-D (x10) averaged over items.

One deliberate difference from the toolkit: captions are tokenized by `normalize_caption`
(lowercase, punctuation stripped, whitespace split) instead of the PTB tokenizer, which needs a
JVM start of its own and is slow. Scores can therefore differ slightly from published numbers
on text with contractions or hyphens; they are comparable across runs of this module.

METEOR runs the METEOR 1.5 jar in a Java subprocess. Without Java, or when that subprocess
fails, METEOR is left out of the metrics and the reason is reported in `skipped` rather than
raised, so the other four metrics are never lost to a missing JRE.
"""

from __future__ import annotations

import shutil
import string
import threading
import unicodedata
from collections.abc import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

METRIC_NAMES = ("BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
JAVA_MISSING_REASON = "needs a Java runtime (java not on PATH): apt-get install default-jre-headless"
# The jar answers a corpus of thousands of captions in seconds; only a hung JVM takes this long.
METEOR_TIMEOUT_S = 600.0

# Apostrophes are deleted rather than turned into spaces so that "man's" and "isn't" stay one
# word each (the PTB tokenizer would split them, but never into a stray "s" or "t" token).
_APOSTROPHES = frozenset("'\u2019\u02bc")

Tokenized = dict[str, list[str]]


def _is_punctuation(char: str) -> bool:
    """ASCII punctuation/symbols plus any Unicode punctuation (curly quotes, dashes, ellipses)."""
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_caption(text: str) -> str:
    """Lowercase, strip punctuation and collapse whitespace: the token string all scorers see.

    Punctuation other than apostrophes becomes a space, so "ice-cream" and "man/woman" split
    into words instead of fusing into one unknown token.
    """
    chars = []
    for char in text.lower():
        if char in _APOSTROPHES:
            continue
        chars.append(" " if _is_punctuation(char) else char)
    return " ".join("".join(chars).split())


def _validate(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    """Reject inputs the COCO scorers would assert on (or silently mis-score)."""
    if not predictions:
        raise ValueError("predictions is empty: nothing to score")
    for key in predictions:
        if key not in references:
            raise ValueError(f"prediction {key!r} has no references")
        if isinstance(references[key], str):
            raise ValueError(f"references for {key!r} must be a list of captions, not one string")
        if len(references[key]) == 0:
            raise ValueError(f"references for {key!r} are empty: need at least one caption")


def _tokenize(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> tuple[Tokenized, Tokenized]:
    """(gts, res) in the scorers' format: id -> list of normalized captions, same keys in both.

    Only ids with a prediction are scored: references for other ids are ignored, as the COCO
    toolkit ignores images the results file does not cover.
    """
    gts = {key: [normalize_caption(ref) for ref in references[key]] for key in predictions}
    res = {key: [normalize_caption(predictions[key])] for key in predictions}
    return gts, res


def _bleu(gts: Tokenized, res: Tokenized) -> dict[str, float]:
    """Corpus BLEU-3 and BLEU-4 (one pass computes BLEU-1..4; 1 and 2 are not reported)."""
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"BLEU-3": float(scores[2]), "BLEU-4": float(scores[3])}


def _rouge(gts: Tokenized, res: Tokenized) -> dict[str, float]:
    """Mean per-item ROUGE-L F-measure (beta = 1.2, best precision/recall over references)."""
    score, _ = Rouge().compute_score(gts, res)
    return {"ROUGE-L": float(score)}


def _cider(gts: Tokenized, res: Tokenized) -> dict[str, float]:
    """CIDEr-D with IDF from this corpus' references (so a single-item corpus always scores 0)."""
    score, _ = Cider().compute_score(gts, res)
    return {"CIDEr": float(score)}


class _MeteorFailed(RuntimeError):
    """The METEOR subprocess died, hung or could not start; the message says which."""


class _ClosableMeteor(Meteor):
    """pycocoevalcap's Meteor with an explicit, idempotent `close`.

    The upstream `__del__` takes the scorer's lock, which `compute_score` leaves held when the
    subprocess dies mid-answer: garbage-collecting a failed scorer would then block forever.
    """

    def stderr_tail(self, limit: int = 300) -> str:
        """The end of the JVM's stderr (its own error message); kills it first so reading ends."""
        self.meteor_p.kill()
        self.meteor_p.wait()
        text = self.meteor_p.stderr.read().decode("utf-8", "replace")
        return " ".join(text.split())[-limit:]

    def close(self) -> None:
        """Stop the JVM and release the lock if a failed `compute_score` left it held."""
        process = getattr(self, "meteor_p", None)
        if process is not None:
            for stream in (process.stdin, process.stdout, process.stderr):
                try:
                    stream.close()
                except OSError:  # flushing into a dead JVM's stdin: nothing left to say to it
                    pass
            process.kill()
            process.wait()
        lock = getattr(self, "lock", None)
        if lock is not None and lock.locked():
            lock.release()

    def __del__(self) -> None:
        self.close()


def _failure_message(scorer: _ClosableMeteor, error: Exception, timed_out: bool) -> str:
    """Why METEOR failed, in the words most useful for fixing it."""
    if timed_out:
        return f"METEOR subprocess failed (no answer within {METEOR_TIMEOUT_S:g} s; killed)"
    code = scorer.meteor_p.poll()
    stderr = scorer.stderr_tail()
    # An early exit leaves the real cause on stderr; the Python error is just its symptom.
    if code is not None and stderr:
        return f"METEOR subprocess failed (java exited with status {code}: {stderr})"
    return f"METEOR subprocess failed ({type(error).__name__}: {error}; stderr: {stderr or 'empty'})"


def _meteor(gts: Tokenized, res: Tokenized) -> float:
    """Corpus METEOR from one JVM; a watchdog kills a hung JVM so the read fails, not hangs."""
    try:
        scorer = _ClosableMeteor()
    except OSError as error:  # java vanished between the PATH check and the start, or no exec bit
        raise _MeteorFailed(f"METEOR subprocess failed to start ({error})") from error
    timed_out = threading.Event()

    def kill_hung_jvm() -> None:
        timed_out.set()
        scorer.meteor_p.kill()

    watchdog = threading.Timer(METEOR_TIMEOUT_S, kill_hung_jvm)
    watchdog.start()
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except (OSError, ValueError) as error:
        # OSError: the pipe to java broke; ValueError: java died (or was killed) before
        # answering, so a score line read back empty.
        raise _MeteorFailed(_failure_message(scorer, error, timed_out.is_set())) from error
    finally:
        watchdog.cancel()
        scorer.close()


def _meteor_or_reason(gts: Tokenized, res: Tokenized) -> tuple[float | None, str | None]:
    """(score, None) on success, (None, why) when METEOR cannot be computed here."""
    if shutil.which("java") is None:
        return None, JAVA_MISSING_REASON
    try:
        return _meteor(gts, res), None
    except _MeteorFailed as error:
        return None, str(error)


def caption_metrics(
    predictions: dict[str, str], references: dict[str, list[str]]
) -> tuple[dict[str, float], dict[str, str]]:
    """Corpus-level COCO caption metrics of `predictions` (id -> caption) against `references`.

    Returns (metrics, skipped): metrics maps "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"
    to scores (CIDEr on the toolkit's x10 scale, the others in [0, 1]); a metric that could not
    be computed is absent from metrics and `skipped` maps its name to the reason.
    Raises ValueError for empty predictions, an id without references or an empty reference list.
    """
    _validate(predictions, references)
    gts, res = _tokenize(predictions, references)
    metrics: dict[str, float] = {**_bleu(gts, res), **_rouge(gts, res), **_cider(gts, res)}
    skipped: dict[str, str] = {}
    meteor, reason = _meteor_or_reason(gts, res)
    if reason is None:
        metrics["METEOR"] = meteor
    else:
        skipped["METEOR"] = reason
    return {name: metrics[name] for name in METRIC_NAMES if name in metrics}, skipped
