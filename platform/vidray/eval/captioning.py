"""Captioning metrics with the COCO caption evaluation conventions (pycocoevalcap scorers).

`caption_metrics` reports corpus-level BLEU-3, BLEU-4, METEOR, ROUGE-L and CIDEr exactly as the
COCO toolkit does: BLEU over the whole corpus with the "closest" reference length, METEOR from
the jar's aggregate statistics, ROUGE-L (beta = 1.2) and CIDEr-D (x10) averaged over items.

Captions are tokenized as the toolkit tokenizes them (`vidray.eval.ptb_tokenizer.tokenize_captions`:
Stanford CoreNLP 3.4.1's PTB tokenizer with `-preserveLines -lowerCase`, then its punctuation
tokens dropped), in pure Python, so no JVM is needed for BLEU, ROUGE-L and CIDEr and the scores
equal pycocoevalcap's on the same captions ("man's" -> "man 's", "isn't" -> "is n't", "(red)" ->
"-lrb- red -rrb-" as the toolkit leaves it). References and predictions are tokenized as two
texts, in item order, as pycocoevalcap's `COCOEvalCap` does.

METEOR runs the METEOR 1.5 jar in a Java subprocess. Without Java, or when that subprocess
fails, METEOR is left out of the metrics and the reason is reported in `skipped` rather than
raised, so the other four metrics are never lost to a missing JRE.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from vidray.eval.ptb_tokenizer import tokenize_captions

METRIC_NAMES = ("BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
JAVA_MISSING_REASON = "needs a Java runtime (java not on PATH): apt-get install default-jre-headless"
# The jar answers a corpus of thousands of captions in seconds; only a hung JVM takes this long.
METEOR_TIMEOUT_S = 600.0

Tokenized = dict[str, list[str]]


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
    """(gts, res) in the scorers' format: id -> list of PTB-tokenized captions, same keys in both.

    Only ids with a prediction are scored: references for other ids are ignored, as the COCO
    toolkit ignores images the results file does not cover. Like pycocoevalcap, all references
    go through the tokenizer as one text and all predictions as another (a caption's last token
    can depend on how the next one starts, as in the jar).
    """
    keys = list(predictions)
    tokenized_refs = iter(tokenize_captions([ref for key in keys for ref in references[key]]))
    gts = {key: [next(tokenized_refs) for _ in references[key]] for key in keys}
    res = {key: [caption] for key, caption in zip(keys, tokenize_captions([predictions[key] for key in keys]))}
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
