"""YAML text -> plain data, remembering the line of every key, and typed validation with located errors.

Pure: callers read files; this module only parses text. Settings and policy files both go through it, so
every configuration mistake is reported the same way: ``file:line: key.path: message``, all at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import pydantic
import yaml

KeyPath = tuple[str | int, ...]

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


@dataclass(frozen=True, slots=True)
class ConfigError:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key or '(top level)'}: {self.message}"


class ConfigErrors(Exception):
    """Every error found in one or more configuration files."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


@dataclass(frozen=True, slots=True)
class LocatedDocument:
    """A parsed YAML document and the 1-based line of each key path in it."""

    file: str
    data: Any
    lines: Mapping[KeyPath, int]

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path`` or, if it is absent (a missing key), of its closest present parent."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def error(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError(self.file, self.line_of(path), format_key_path(path), message)


def format_key_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def parse_yaml(text: str, file: str) -> LocatedDocument:
    """Parse one YAML document safely; duplicate keys and non-string keys are errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigErrors([ConfigError(file, line, "", f"invalid YAML: {problem}")]) from None
    if node is None:
        return LocatedDocument(file, {}, {(): 1})
    lines: dict[KeyPath, int] = {}
    errors: list[ConfigError] = []
    data = _construct(node, (), lines, errors, file)
    if errors:
        raise ConfigErrors(errors)
    return LocatedDocument(file, data, lines)


def _construct(
    node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], errors: list[ConfigError], file: str
) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                errors.append(ConfigError(file, line, format_key_path(path), f"key {key!r} must be a string"))
                continue
            if key in result:
                errors.append(ConfigError(file, line, format_key_path((*path, key)), "duplicate key"))
                continue
            lines[(*path, key)] = line
            result[key] = _construct(value_node, (*path, key), lines, errors, file)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), lines, errors, file) for i, item in enumerate(node.value)]
    return _scalar(node)


_SCALARS = yaml.SafeLoader("")


def _scalar(node: yaml.Node) -> Any:
    """Construct a scalar with the safe loader's typing rules (ints, bools, nulls...); other nodes: None."""
    if not isinstance(node, yaml.ScalarNode):
        return None
    return _SCALARS.construct_object(node, deep=True)


def parse_duration(value: Any) -> float:
    """``"10m"``, ``"30s"``, ``"4h"``, ``"1d"``, ``"500ms"`` or a number of seconds -> seconds (float)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 10m, 4h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as 30s, 10m, 4h (got {value!r})")
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero")
    return float(seconds)


#: A duration field of a settings or policy model: accepts "10m", "30s", "4h" or seconds; holds seconds.
Duration = Annotated[float, pydantic.BeforeValidator(parse_duration)]

Model = TypeVar("Model", bound=pydantic.BaseModel)


def validate(
    model: type[Model], document: LocatedDocument, *, context: dict[str, Any] | None = None
) -> Model:
    """Validate a whole document against a pydantic model; raise :class:`ConfigErrors` with every error."""
    try:
        return model.model_validate(document.data, context=context)
    except pydantic.ValidationError as exc:
        raise ConfigErrors(located_errors(exc, document)) from None


def located_errors(exc: pydantic.ValidationError, document: LocatedDocument) -> list[ConfigError]:
    errors = []
    for error in exc.errors(include_url=False):
        path = tuple(part for part in error["loc"] if isinstance(part, str | int))
        # Tagged unions and function validators add their own names to loc: keep only real keys.
        path = _real_key_path(document.data, path)
        errors.append(document.error(path, _message(error)))
    return errors


def _real_key_path(data: Any, path: KeyPath) -> KeyPath:
    real: list[str | int] = []
    node = data
    for part in path:
        if isinstance(node, Mapping) and isinstance(part, str):
            real.append(part)
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            real.append(part)
            node = node[part] if 0 <= part < len(node) else None
        elif node is None and isinstance(part, str) and not part.startswith(("function-", "tagged-union")):
            real.append(part)  # a missing key: name it, its line is its parent's
        # Anything else is a validator's name (e.g. "function-after[...]"): not a key.
    return tuple(real)


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")
