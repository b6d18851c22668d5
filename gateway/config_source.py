"""YAML text -> plain data, remembering the line of every key, and typed validation with located errors.

Pure: callers read files; this module only parses text. Settings and policy files both go through it, so
every configuration mistake is reported the same way: ``file:line: key.path: message``, all at once.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
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
    #: Set for YAML syntax errors, which belong to a place in the text rather than to a key.
    column: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        if self.column is not None:
            return f"{where}:{self.column}: {self.message}"
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
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise ConfigErrors([ConfigError(file, line, "", _yaml_problem(exc), column)]) from None
    except yaml.YAMLError as exc:
        raise ConfigErrors([ConfigError(file, None, "", f"invalid YAML: {exc}")]) from None
    if node is None:
        return LocatedDocument(file, {}, {(): 1})
    lines: dict[KeyPath, int] = {}
    errors: list[ConfigError] = []
    data = _construct(node, (), lines, errors, file)
    if errors:
        raise ConfigErrors(errors)
    return LocatedDocument(file, data, lines)


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's parser-speak in words: what is wrong, and what to do about it."""
    problem, context = exc.problem or "", exc.context or ""
    opened = f" on line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
    if "'\\t'" in problem or "\t" in problem:
        return "YAML syntax: a tab character; YAML indents with spaces only"
    if problem.startswith("mapping values are not allowed"):
        return (
            "YAML syntax: a 'key: value' where none can start: check this line's indentation against the"
            " line above, or quote a value that contains ': '"
        )
    if "expected <block end>" in problem and "'-'" in problem:
        return f"YAML syntax: a list item ('- ') among the keys of the block that starts{opened}: indent it under its key"
    if "expected <block end>" in problem:
        return f"YAML syntax: this line is not indented like the other keys of the block that starts{opened}"
    if "could not find expected ':'" in problem:
        return (
            "YAML syntax: a key without ':' (or a line continuing the previous one at the wrong indentation)"
        )
    if "<stream end>" in problem and "flow" in context:
        return "YAML syntax: the file ends inside a '[…]' list or a '{…}' mapping that is never closed"
    if "flow sequence" in context:
        return f"YAML syntax: the list opened with '['{opened} is not closed by ']' (or a comma is missing)"
    if "flow mapping" in context:
        return (
            f"YAML syntax: the mapping opened with '{{'{opened} is not closed by '}}' (or a comma is missing)"
        )
    if "quoted scalar" in context:
        return f"YAML syntax: the quoted text started{opened} has no closing quote"
    if "undefined alias" in problem:
        return f"YAML syntax: {problem} (an alias *name needs an anchor &name before it)"
    return f"YAML syntax: {problem or context}"


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
        raise ConfigErrors(located_errors(exc, document, model)) from None


def located_errors(
    exc: pydantic.ValidationError, document: LocatedDocument, model: type[pydantic.BaseModel] | None = None
) -> list[ConfigError]:
    errors = []
    for error in exc.errors(include_url=False):
        path = tuple(part for part in error["loc"] if isinstance(part, str | int))
        # Tagged unions and function validators add their own names to loc: keep only real keys.
        path = _real_key_path(document.data, path)
        message = _message(error)
        if error["type"] == "extra_forbidden" and model is not None and path and isinstance(path[-1], str):
            message += _suggestion(path[-1], known_keys(model, path[:-1]))
        errors.append(document.error(path, message))
    return errors


def _suggestion(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known keys here: {', '.join(known)})" if 0 < len(known) <= 12 else ""


def known_keys(model: type[pydantic.BaseModel], path: KeyPath) -> list[str]:
    """The keys a document may hold at ``path`` (a mapping's path) according to ``model``."""
    annotations: list[Any] = [model]
    for part in path:
        annotations = [inner for annotation in annotations for inner in _children(annotation, part)]
    return sorted({name for annotation in annotations for name in _fields(annotation)})


def _children(annotation: Any, part: str | int) -> list[Any]:
    """The annotations found under ``part`` (a key, or a list index) of a value of type ``annotation``."""
    found: list[Any] = []
    for candidate in _alternatives(annotation):
        if (
            isinstance(part, str)
            and isinstance(candidate, type)
            and issubclass(candidate, pydantic.BaseModel)
        ):
            for name, field in candidate.model_fields.items():
                if part in (name, field.alias):
                    found.append(field.annotation)
        origin = typing.get_origin(candidate)
        if isinstance(part, int) and origin in (list, tuple, set, frozenset):
            found.extend(arg for arg in typing.get_args(candidate) if arg is not Ellipsis)
        if isinstance(part, str) and origin in (dict, Mapping):
            found.extend(typing.get_args(candidate)[1:])
    return found


def _alternatives(annotation: Any) -> list[Any]:
    """``A | B | None`` and ``Annotated[A, ...]`` -> [A, B]."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _alternatives(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [alt for arg in typing.get_args(annotation) for alt in _alternatives(arg)]
    return [annotation]


def _fields(annotation: Any) -> list[str]:
    return [
        field.alias or name
        for candidate in _alternatives(annotation)
        if isinstance(candidate, type) and issubclass(candidate, pydantic.BaseModel)
        for name, field in candidate.model_fields.items()
    ]


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
