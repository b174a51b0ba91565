"""Typed configs on pydantic: declared bounds, strict keys, YAML plus dotted overrides.

Each stage owns its config class (the model's lives in `model.py`, training's in
`train.py`, ...), declared with `@config_dataclass`: a frozen pydantic dataclass whose
fields carry their types and bounds (``steps: Annotated[int, Field(ge=1)] = 1000``) and
that refuses unknown keys. Call sites build configs as before (``TrainConfig(steps=3)``,
``dataclasses.replace``); a bad value is a one-line `ConfigError` naming the field.

This module holds only the generic machinery, so every config behaves the same way:

* `load_config(cls, path, overrides, base=..., flags=...)` is THE loader every command
  uses: defaults < `base` (e.g. a run's saved config) < the YAML file < command-line flags
  < ``--set key=value`` overrides; an error names the file (or the override) and the key;
* `from_dict(cls, mapping)` validates a (possibly nested) mapping into `cls`;
* `apply_overrides(cfg, ["train.steps=200", "model.n_layer=4"])` returns a new config;
* `to_dict(cfg)` is the inverse of `from_dict` (what artifacts record as lineage).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from mega_trading.core.errors import ConfigError

T = TypeVar("T")

# --- field types with declared bounds ---------------------------------------------------------
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
UnitFraction = Annotated[float, Field(gt=0, le=1)]  # (0, 1]


def _auto_bool(value: Any) -> Any:
    if value in ("auto", "true", "false") or isinstance(value, bool):
        return value
    raise ValueError(f"must be auto, true or false, got {value!r}")


# auto | true | false (strings, as YAML and CLI spell them) or a YAML boolean
AutoBool = Annotated[str | bool, BeforeValidator(_auto_bool)]

_PYDANTIC_CONFIG = ConfigDict(extra="forbid")


def _is_tuple(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_tuple(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(arg) for arg in typing.get_args(annotation))
    return origin in (tuple, list) or annotation in (tuple, list)


def _split_commas(cls: type, value: Any, info: pydantic.ValidationInfo) -> Any:
    """'0.8,0.1,0.1' for a tuple field means [0.8, 0.1, 0.1] (CLI flags and --set)."""
    if isinstance(value, str) and _is_tuple(cls.__pydantic_fields__[info.field_name].annotation):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def config_dataclass(cls: type[T] | None = None, /, *, frozen: bool = True) -> Any:
    """A frozen pydantic dataclass that forbids unknown keys and raises `ConfigError`.

    Validators (`pydantic.model_validator(mode="after")`) hold the checks that involve
    several fields; they raise ValueError, reported with the field's dotted name.
    """

    def wrap(klass: type[T]) -> type[T]:
        klass._split_commas = field_validator("*", mode="before")(_split_commas)  # type: ignore[attr-defined]
        built = pydantic.dataclasses.dataclass(frozen=frozen, config=_PYDANTIC_CONFIG)(klass)
        init = built.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise ConfigError(describe_error(exc, built)) from None

        built.__init__ = __init__
        return built

    return wrap if cls is None else wrap(cls)


# --- one-line error messages ------------------------------------------------------------------
_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "finite_number": "must be a finite number",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "literal_error": "must be one of {expected}",
    "dict_type": "must be a mapping",
    "dataclass_type": "must be a mapping",
    "dataclass_args_type": "must be a mapping",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "missing_argument": "is required",
    "missing": "is required",
}
_UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden")


def _field_names(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _class_at(cls: Any, path: list[str]) -> Any:
    """The config class reached from `cls` along dotted `path` (None if not a dataclass)."""
    for part in path:
        if not dataclasses.is_dataclass(cls):
            return None
        fields = getattr(cls, "__pydantic_fields__", None)
        info = fields.get(part) if fields else None
        if info is None:
            return None
        annotation = info.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next((a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)), None)
        cls = annotation
    return cls


def _dotted(loc: tuple, cls: Any) -> list[str]:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int) and i == 0 and dataclasses.is_dataclass(cls):
            names = _field_names(cls)  # a positional argument
            parts.append(names[item] if item < len(names) else str(item))
        else:
            parts.append(str(item))
    return parts


def describe_error(exc: ValidationError, cls: Any = None, prefix: str = "") -> str:
    """The first error of a pydantic ValidationError as one line naming the dotted key."""
    errors = exc.errors(include_url=False)
    errors.sort(key=lambda e: e["type"] not in _UNKNOWN_KEY)  # a misspelt key explains the rest
    err = errors[0]
    path = [prefix.rstrip(".")] if prefix else []
    path += _dotted(err["loc"], cls)
    key = ".".join(p for p in path if p)
    kind = err["type"]
    if kind in _UNKNOWN_KEY:
        valid = _field_names(_class_at(cls, _dotted(err["loc"], cls)[:-1]))
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        text = f"unknown config key '{key}'"
        if valid:
            text += f"; valid keys: {', '.join(parent + name for name in valid)}"
    elif kind == "value_error":
        message = str(err["ctx"]["error"]) if err.get("ctx") else err["msg"]
        joiner = " " if message.startswith(("must ", "is ")) else ": "  # a field's own check
        text = f"{key}{joiner}{message}" if key else message
    else:
        template = _MESSAGES.get(kind)
        message = template.format(**err.get("ctx", {})) if template else err["msg"][:1].lower() + err["msg"][1:]
        got = "" if kind.startswith("missing") else f", got {err.get('input')!r}"
        text = f"{key} {message}{got}" if key else f"{message}{got}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more error(s))"
    return text


# --- dicts <-> configs ------------------------------------------------------------------------

def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-JSON view of a dataclass config (tuples become lists)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = [to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        elif isinstance(value, (dict, list)):
            value = copy.deepcopy(value)  # overrides must never mutate the frozen original
        out[field.name] = value
    return out


def from_dict(cls: type[T], mapping: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build `cls` from a mapping; unknown keys and bad values are a one-line `ConfigError`."""
    if mapping is not None and not isinstance(mapping, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping, got {mapping!r}")
    try:
        return cls.__pydantic_validator__.validate_python(dict(mapping or {}))  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, cls, prefix)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.steps=200' -> (['train', 'steps'], 200) with YAML typing of the value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_nested(mapping: dict[str, Any], path: list[str], value: Any) -> None:
    node = mapping
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`update` laid over `base`; nested mappings merge key by key (a YAML that sets
    model.d_model keeps the base's model.n_layer)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """A new config with dotted-key overrides applied; unknown keys are an error."""
    data = to_dict(cfg)
    for text in overrides:
        path, value = parse_override(text)
        _set_nested(data, path, value)
    return from_dict(type(cfg), data)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), *,
                base: T | Mapping[str, Any] | None = None,
                flags: Mapping[str, Any] | None = None) -> T:
    """The one config loader: defaults < `base` < YAML file `path` < `flags` < `overrides`.

    `base` is a config or mapping to start from (a run's saved config, a command's own
    defaults); `flags` maps dotted keys to command-line values, None meaning "not given";
    `overrides` are ``key=value`` strings (``--set``). Unknown keys anywhere are an error;
    errors in the file name the file.
    """
    data: dict[str, Any] = to_dict(base) if dataclasses.is_dataclass(base) else dict(base or {})
    if path is not None:
        data = _deep_merge(data, read_yaml_mapping(path))
        try:
            from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for key, value in (flags or {}).items():
        if value is not None:
            _set_nested(data, key.split("."), value)
    for text in overrides:
        key_path, value = parse_override(text)
        _set_nested(data, key_path, value)
    return from_dict(cls, data)


def load_yaml(cls: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
    """`load_config` with a file (kept for callers that read one YAML)."""
    return load_config(cls, path, overrides)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
