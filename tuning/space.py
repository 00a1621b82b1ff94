"""Search spaces over dotted config paths, checked against the jobs' config schemas.

    space:
      objective.mmm_ratio: {grid: [0.0, 0.3, 0.5, 0.7]}    # every value (Tune grid_search)
      objective.mlm_prob: {uniform: [0.1, 0.3]}            # sampled per trial
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      finetune.optim.lr: {choice: [1.0e-4, 1.0e-3]}        # a fine-tuning key
      tokenizer:                                           # several keys that go together
        grid:
          - {model.text_backbone: null, data.text: s3://.../text/v-aaa}
          - {model.text_backbone: /models/minilm, data.text: s3://.../text/v-bbb}

A path goes to the pre-training config unless it starts with ``finetune.`` (``pretrain.`` may be
written for clarity). A trial's config is the sweep's job config with the trial's values applied
as overrides, so it is validated by the same schema as `vidray pretrain key=value`: the schema of
the sweep's architecture (``pretrain.model.arch``), i.e. the classes of ``sweep.pretrain`` and
``sweep.finetune``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from vidray.config import ConfigError, from_dict, merge, parse_overrides

KINDS = ("grid", "choice", "uniform", "loguniform")


def candidates(key: str, spec: Any) -> tuple[str, list]:
    """(kind, values) of one space entry; raises ConfigError on a malformed one."""
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(where, f"must be one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [lo, hi]}}, "
                          f"{{loguniform: [lo, hi]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(where, f"{kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                or values[0] >= values[1]:
            raise ConfigError(where, f"{kind} needs [lo, hi] with lo < hi, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(where, f"loguniform needs lo > 0, got {values!r}")
    return kind, values


def overrides_of(key: str, value: Any) -> list[tuple[str, Any]]:
    """The (path, value) pairs one sampled value sets: a mapping value sets each of its paths."""
    if isinstance(value, dict):
        return list(value.items())
    return [(key, value)]


def _stage_and_path(path: str) -> tuple[str, str]:
    for stage in ("pretrain", "finetune"):
        if path.startswith(stage + "."):
            return stage, path[len(stage) + 1:]
    return "pretrain", path


def trial_configs(sweep, params: dict[str, Any], forced: dict[str, dict]) -> tuple[Any, Any | None]:
    """The trial's typed job configs, of the same classes as the sweep's ``pretrain`` / ``finetune``
    (VLM or frames model), with ``params`` applied, then ``forced`` (per stage: run names, storage,
    MLflow) on top. Raises ConfigError naming the path when a value is invalid."""
    updates: dict[str, list[str]] = {"pretrain": [], "finetune": []}
    values: dict[str, dict] = {"pretrain": {}, "finetune": {}}
    for key, value in params.items():
        for path, v in overrides_of(key, value):
            stage, inner = _stage_and_path(path)
            if stage == "finetune" and sweep.finetune is None:
                raise ConfigError(f"space.{key}", f"{path} sweeps fine-tuning, but the sweep has no "
                                  "finetune: stage")
            values[stage] = merge(values[stage], _nested(inner, v))
            updates[stage].append(inner)
    pretrain = _build(type(sweep.pretrain), dataclasses.asdict(sweep.pretrain), values["pretrain"],
                      forced.get("pretrain", {}), "pretrain")
    if sweep.finetune is None:
        return pretrain, None
    base = dataclasses.asdict(sweep.finetune)
    base["model"] = dataclasses.asdict(pretrain.model)  # init_from needs the same architecture
    # An empty data URI means "the trial's pre-training one" (VLM: features, text, manifest;
    # frames models: frames, manifest, qa); splits and task-only keys are fine-tuning's own.
    pretrain_data = dataclasses.asdict(pretrain.data)
    for key, value in base["data"].items():
        if value in ("", {}) and key in pretrain_data:
            base["data"][key] = pretrain_data[key]
    finetune = _build(type(sweep.finetune), base, values["finetune"], forced.get("finetune", {}), "finetune")
    return pretrain, finetune


def _nested(path: str, value: Any) -> dict:
    node: dict = {}
    root = node
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return root


def _build(cls, base: dict, values: dict, forced: dict, stage: str):
    try:
        return from_dict(cls, merge(merge(base, values), forced))
    except ConfigError as err:  # name the path as the sweep config spells it
        raise ConfigError(f"{stage}.{err.key}", str(err).split(": ", 1)[-1]) from None


def check(sweep) -> list[str]:
    """Validate every space entry against the job schemas before anything starts.

    A malformed entry or an unknown path raises ConfigError. A value the schema rejects (e.g.
    ``objective.mmm_ratio: 1.5`` in a grid) is returned as a problem instead: that trial will fail
    with the same message while the sweep goes on with the others."""
    problems = []
    for key, spec in sweep.space.items():
        kind, values = candidates(key, spec)
        for value in values:  # uniform/loguniform: both bounds
            for path, _ in overrides_of(key, value):
                _check_path(sweep, key, path)
            try:
                trial_configs(sweep, {key: value}, {})
            except ConfigError as err:
                problems.append(f"{key}={value!r}: {err}")
    return problems


def _check_path(sweep, key: str, path: str) -> None:
    stage, inner = _stage_and_path(path)
    if stage == "finetune" and sweep.finetune is None:
        raise ConfigError(f"space.{key}", f"{path} sweeps fine-tuning, but the sweep has no finetune: stage")
    node, parts = type(sweep.pretrain if stage == "pretrain" else sweep.finetune), inner.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            near = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" (did you mean '{'.'.join(parts[:i] + near)}'?)" if near else ""
            raise ConfigError(f"space.{key}", f"{path!r} is not a {stage} config key{hint}; "
                              f"`vidray {stage} --help` lists them")
        node = typing.get_type_hints(node)[part]


def tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """The Ray Tune param space of a validated ``space``."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](values) for key, (kind, values) in
            ((k, candidates(k, s)) for k, s in space.items())}


def parse_space_override(items: list[str]) -> dict:
    """``space.objective.mmm_ratio={grid: [0, 0.5]}`` style overrides keep the dotted key whole."""
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        out.update({key[len("space."):]: parse_overrides([f"x={raw}"])["x"]})
    return out
