"""Typed configs: dataclasses, YAML presets, dotted overrides, validation that names the key.

A component declares its config as a dataclass whose fields use :func:`option` (default, help
text, bounds). A run is a YAML preset plus overrides such as ``objective.mmm_ratio=0.3``.
Everything is checked before any work starts: an unknown key, a wrong type or an out-of-range
value raises :class:`ConfigError`, whose one-line message names the dotted key.

    cfg = load_config(PretrainConfig, "configs/demo/pretrain.yaml", ["objective.mmm_ratio=0.3"])
    flatten(cfg)      # {"objective.mmm_ratio": "0.3", ...}  -> MLflow params
    dump_yaml(cfg)    # loads back to an equal config

The sections live beside this module, light dataclasses that every layer may read:
:mod:`vidray.config.vlm` (VLM's model, objective and data), :mod:`vidray.config.frames` (the
frames models and the VQ tokenizer) and :mod:`vidray.config.train` (optimiser, loop and the jobs).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union

import yaml

from vidray import storage


T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range. ``key`` is its dotted path."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config key '{key}': {message}" if key else message)

    def __reduce__(self):  # Ray copies and pickles errors to carry them across processes
        return type(self), (self.key, self.message)


def option(default: Any = dataclasses.MISSING, help: str = "", *, ge=None, gt=None, le=None, lt=None,
           name: bool = False, required: bool = False, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its documentation and numeric bounds (checked on load); ``name``
    marks a value that becomes one folder name in a storage path (checked by :func:`check_name`);
    ``required``, a value a job cannot run without although its default is empty (the command
    line checks it before importing the job: :func:`missing_required`)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    flags = {**({"name": True} if name else {}), **({"required": True} if required else {})}
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, **bounds, **flags})


def missing_required(cfg: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(key, help) of every ``required`` field of ``cfg`` still empty, nested configs included
    (not those typed ``Any``: a sweep's job configs are completed per trial)."""
    hints = typing.get_type_hints(type(cfg))
    missing = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if f.metadata.get("required") and value in ("", None):
            missing.append((key, f.metadata["help"]))
        elif dataclasses.is_dataclass(hints.get(f.name)) and dataclasses.is_dataclass(value):
            missing += missing_required(value, key + ".")
    return missing


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,199}")


def check_name(key: str, value: str) -> str:
    """``value`` if it is safe as one folder name under a storage root: letters, digits, ``._=-``,
    not starting with a dot, so a name from a config can never point outside its root."""
    if not _NAME.fullmatch(value):
        raise ConfigError(key, f"{value!r} is not a plain name (letters, digits, '.', '_', '=', '-'; "
                          "no '/', no leading '.'): it names a folder under the storage root")
    return value


# Credentials that could sit in a config value: masked wherever configs are logged or saved.
_URL_PASSWORD = re.compile(r"(\w+://[^/@:\s]+:)[^/@\s]+@")
_SECRET_WORDS = {"password", "passwd", "secret", "token", "credentials", "apikey"}


def redact(node: Any) -> Any:
    """``node`` (a dict from :func:`to_dict`, a list or a string) with credentials masked: the
    password in ``scheme://user:password@host`` and the value of any key named like a secret
    (``*_password``, ``secret_*``, ``*_token``; ``tokenizer`` is not one)."""
    if isinstance(node, dict):
        return {k: "***" if v not in (None, "") and _SECRET_WORDS & set(str(k).lower().split("_"))
                else redact(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact(v) for v in node]
    if isinstance(node, str):
        return _URL_PASSWORD.sub(r"\1***@", node)
    return node


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_optional(tp):  # "int or null", not the bare "Optional" of typing's name
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if typing.get_origin(tp) in (list, tuple, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if _is_optional(tp):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner[0] if len(inner) == 1 else Union[tuple(inner)], key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported annotation {tp!r}")  # a bug in the schema, not the input


def _check_bounds(value: Any, meta: typing.Mapping, key: str) -> None:
    if meta.get("name") and value:  # None / "" = derived
        check_name(key, value)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    checks = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
              "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for name, (ok, sign) in checks.items():
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(key, f"must be {sign} {meta[name]}, got {value!r}")


def from_dict(cls: type[T], data: dict | None, prefix: str = "", validate: bool = True) -> T:
    """Build ``cls`` from a nested dict, validating every key (see module docstring); not
    ``validate``: without the top-level class's own ``validate()`` (`--print-config` shows a
    config whose required values are still empty)."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            near = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{near[0]}'?)" if near else ""
            raise ConfigError(f"{prefix}.{name}" if prefix else str(name), f"unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "is required")
            continue
        value = _convert(data[name], hints[name], key)
        _check_bounds(value, f.metadata, key)
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None) if validate else None
    if check is not None:
        try:
            check()
        except ConfigError as err:
            if prefix and not err.key.startswith(prefix):
                raise ConfigError(f"{prefix}.{err.key}", str(err).split(": ", 1)[-1]) from None
            raise
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value (e.g. objective.mmm_ratio=0.3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        value = _number_if_numeric(value)
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "conflicts with another override")
        node[parts[-1]] = value
    return tree


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number_if_numeric(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; people mean a number."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# The presets that ship inside the package (configs/ in the repository is a link to this folder).
PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")  # vidray/presets


def _preset_file(name: str) -> str:
    """Where the packaged preset ``name`` would be (``configs/`` and ``.yaml`` optional)."""
    relative = name.removeprefix("configs/")
    return os.path.join(PRESETS_DIR, relative if relative.endswith((".yaml", ".yml")) else relative + ".yaml")


def preset(name: str) -> str:
    """The file of a packaged preset: ``demo/pretrain.yaml`` (``configs/`` and ``.yaml`` optional)."""
    path = _preset_file(name)
    if not os.path.isfile(path):
        raise ConfigError("", f"no preset {name!r}; the presets are: {', '.join(preset_names())}")
    return path


def preset_names() -> list[str]:
    """Every packaged preset, as ``folder/name.yaml``."""
    return sorted(os.path.relpath(os.path.join(d, f), PRESETS_DIR) for d, _, files in os.walk(PRESETS_DIR)
                  for f in files if f.endswith(".yaml"))


def config_path(path: str) -> str:
    """``path`` if it names a file (or a URI); else the packaged preset of that name, so
    `vidray pretrain demo/pretrain.yaml` and `configs/demo/pretrain.yaml` work from any directory
    (neither: ``path``, which read_yaml then says does not exist)."""
    if "://" in path or os.path.exists(path):
        return path
    packaged = _preset_file(path)
    return packaged if os.path.isfile(packaged) else path


def read_yaml(path: str) -> dict:
    """Read a YAML mapping from a local path or URI, or a packaged preset (:func:`config_path`)."""

    path = config_path(path)
    try:
        with storage.open_uri(path, "rb") as f:
            data = yaml.safe_load(f)
    except storage.StorageError as err:
        hint = "" if "://" in path else " (or name a packaged preset, e.g. demo/pretrain.yaml: see configs/)"
        raise ConfigError("", f"config file {err}{hint}") from None
    except yaml.YAMLError as err:
        raise ConfigError("", f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | None = None, overrides: list[str] | None = None,
                validate: bool = True) -> T:
    """The preset at ``path`` (if any) with ``overrides`` applied, validated (see :func:`from_dict`)."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, merge(data, parse_overrides(overrides or [])), validate=validate)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    """The config as YAML, credentials masked (:func:`redact`)."""
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)


def flatten(cfg: Any) -> dict[str, str]:
    """Dotted-key string params for MLflow (lists and dicts as JSON, None as 'null'), credentials
    masked."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple, dict)):
            out[prefix] = json.dumps(node)
        else:
            out[prefix] = "null" if node is None else str(node)

    walk(redact(to_dict(cfg)), "")
    return out


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field, for `--help` and the docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        default = "(required)" if f.metadata.get("required") else f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
