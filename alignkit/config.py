"""Recipe configs: one dataclass per recipe, filled from YAML and ``key=value`` overrides.

Precedence, lowest first: dataclass defaults, the packaged ``configs/<recipe>.yaml``,
the user's ``--config FILE.yaml``, then ``key=value`` pairs from the command line.
Dotted keys (``lora.r=16``) address nested dataclasses. Every value is converted to
the field's declared type; an unknown key or a value of the wrong type is an
:class:`~alignkit.errors.InputError` naming the file (or ``command line``) and key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from alignkit.errors import InputError

PACKAGED_CONFIGS = Path(__file__).parent / "configs"

C = TypeVar("C")


def doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with a one-line help text (shown by ``--help``)."""
    if default is not dataclasses.MISSING and isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(
            default_factory=lambda: type(value)(value), metadata={"help": text}
        )
    return dataclasses.field(default=default, metadata={"help": text}, **kwargs)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert ``value`` (a YAML scalar or a command-line string) to type ``tp``."""
    tp, optional = _strip_optional(tp)
    if optional and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))
    ):
        return None

    def bad(expected: str) -> InputError:
        return InputError(f"expects {expected}, got {value!r}", path=source, field=key)

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise bad("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                raise bad("an integer") from None
            if as_float.is_integer():
                return int(as_float)
            raise bad("an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad("a string")
        return str(value)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item_tp, key, source) for v in value]
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML reads `false` as a bool; the choice is the word
            value = str(value).lower()
        if value in choices:
            return value
        raise bad("one of " + ", ".join(map(str, choices)))
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise bad("a mapping")
    return value


def _apply(obj: Any, key: str, value: Any, source: str, prefix: str = "") -> None:
    """Set dotted ``key`` on dataclass ``obj`` (recursing into nested dataclasses)."""
    head, _, rest = key.partition(".")
    names = {f.name for f in dataclasses.fields(obj)}
    full_key = prefix + head
    if head not in names:
        known = ", ".join(sorted(names))
        raise InputError(f"unknown key (known: {known})", path=source, field=prefix + key)
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise InputError("is not a section", path=source, field=full_key)
        _apply(current, rest, value, source, full_key + ".")
        return
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise InputError("expects a mapping", path=source, field=full_key)
        for sub_key, sub_value in value.items():
            _apply(current, str(sub_key), sub_value, source, full_key + ".")
        return
    setattr(obj, head, _coerce(value, typing.get_type_hints(type(obj))[head], full_key, source))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning parse errors into one-line input errors."""
    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", path=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise InputError(
            f"invalid YAML ({getattr(err, 'problem', err)})", path=str(path), line=line
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError("must be a mapping of key: value", path=str(path))
    return data


def load_config(
    cls: type[C],
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> C:
    """Build a ``cls`` instance from packaged defaults, a YAML file and overrides."""
    config = cls()
    if recipe is not None and (PACKAGED_CONFIGS / f"{recipe}.yaml").is_file():
        packaged = PACKAGED_CONFIGS / f"{recipe}.yaml"
        for key, value in read_yaml(packaged).items():
            _apply(config, key, value, str(packaged))
    if config_file is not None:
        for key, value in read_yaml(config_file).items():
            _apply(config, key, value, str(config_file))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"expected key=value, got {item!r}", path="command line")
        _apply(config, key.strip(), yaml_scalar(value), "command line")
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def yaml_scalar(text: str) -> Any:
    """Parse a command-line value the way YAML would (``1e-5`` -> float, ``true`` -> bool)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads 1e-5 as a string; accept it as a number.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config, for saving next to the model."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def check(condition: bool, key: str, message: str, source: str = "config") -> None:
    """Raise an :class:`InputError` for config key ``key`` unless ``condition`` holds."""
    if not condition:
        raise InputError(message, path=source, field=key)


def field_help(cls: type) -> list[tuple[str, str, Any]]:
    """(name, help, default) for each field, nested sections flattened with dots."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            for name, text, default in field_help(type(value)):
                rows.append((f"{f.name}.{name}", text, default))
        else:
            rows.append((f.name, f.metadata.get("help", ""), value))
    return rows
