"""The one loader for every YAML and JSON file the project reads (configs, sweep files, a sweep folder's
sweep.yaml, meta.json and evals.jsonl, a checkpoint's info.json and ema.json, metadata.jsonl).

Every file goes through the same bounds and checks, and every refusal is one UserError line that
names the file:
- size: a file is read only up to a limit (a 10 GB file, or /dev/zero, is refused without reading it);
- text: UTF-8, else "is not a text file (not UTF-8)";
- nesting: at most MAX_DEPTH levels (YAML: counted while composing, before any recursion limit);
- aliases: at most MAX_VALUES values once YAML aliases and merge keys (`<<: *a`) are expanded, an
  alias bomb is refused in well under a second;
- duplicate keys: refused in YAML and in JSON (both parsers keep the last one silently); a YAML
  merge key is no duplicate: explicit keys override merged ones, as YAML says;
- shape: where a caller expects a mapping or a list, "must hold <what it expects>, not a <type>".

YAML is read with YAML 1.2's core schema (`1e-4` is a float, only true/false are booleans), JSON with
Python's json plus the checks above. Torch-free and quick to import: the command-line parsers use it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError, preview

MAX_DEPTH = 64  # nesting levels; configs use 3, sweep files 4
MAX_VALUES = 10_000  # YAML values (keys and list items included), also once aliases and merge keys are
# expanded: a config holds about 150. PyYAML reads some 10,000 values a second on a busy core.
MAX_CHARS = 1 << 20  # default size limit of a JSON file, in characters
MAX_YAML_CHARS = 1 << 18  # of a YAML file: a config is a few kilobytes, PyYAML reads about 1 MB a second
MAX_YAML_VALUES = MAX_VALUES  # the name config.py exported before this module existed


class StructuredFileError(UserError):
    """A file the loader refused: `label` names the file ("config file runs/x.yaml"), `problem` says what
    is wrong ("is not valid JSON (line 3, column 1): ..."). Callers with their own wording for a damaged
    file (a checkpoint's info.json) catch it and use `reason`, the problem without a leading "is"."""

    def __init__(self, label: str, problem: str, fix: str = ""):
        self.label, self.problem, self.fix = label, problem, fix
        super().__init__(f"{label} {problem}" + (f"; {fix}" if fix else ""))

    @property
    def reason(self) -> str:
        return self.problem.removeprefix("is ")


class _Refused(Exception):
    """Raised inside the parsers; becomes a StructuredFileError (or a UserError) with the file's label."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def _too_deep() -> _Refused:
    return _Refused(f"is nested too deeply (more than {MAX_DEPTH} levels): no file this project reads needs that")


def _bomb() -> _Refused:
    return _Refused(f"holds more than {MAX_VALUES} values once its aliases (*name) are expanded; a file this project "
                    "reads never needs that many (is it an alias bomb?)")


# -- YAML --------------------------------------------------------------------------------------------

# YAML as people write configs: `1e-4` is a float and only true/false are booleans (YAML 1.2's core
# schema). PyYAML follows YAML 1.1, where `1e-4` is a string and `on`, `yes`, `no` are booleans.
_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_REPLACED_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float", "timestamp")}
_MERGE = "tag:yaml.org,2002:merge"


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 core-schema booleans, integers and floats, no implicit timestamps,
    no duplicate keys (PyYAML keeps the last silently, so `lr` written twice would hide the first),
    nesting bounded while composing and merge keys expanded within the value budget."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0
        self.nodes = 0
        self.merged = 0  # mapping entries copied by merge keys so far
        self.flattening: set[int] = set()  # ids of the mapping nodes being flattened (a merge cycle)

    def compose_node(self, parent, index):
        self.depth += 1
        self.nodes += 1
        if self.depth > MAX_DEPTH:
            raise _too_deep()
        if self.nodes > MAX_VALUES:  # counted while reading: a huge file is refused at this point, not at its end
            raise _Refused(f"holds more than {MAX_VALUES} values; no file this project reads needs that many")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """PyYAML's merge-key expansion (explicit keys after the merged ones, so they win; of several
        merged mappings the first wins), keeping each key once, so merging a mapping twice, or nesting
        merges 30 deep, cannot double a mapping at every level; the copies count against MAX_VALUES.
        Remembers how many leading entries came from merges: those are no duplicates."""
        if not any(key.tag == _MERGE for key, _ in node.value):
            return
        if id(node) in self.flattening:
            raise yaml.constructor.ConstructorError(None, None, "a merge key (<<) that merges its own mapping",
                                                    node.start_mark)
        self.flattening.add(id(node))
        try:
            merged: list[tuple[yaml.Node, yaml.Node]] = []
            explicit = []
            for key_node, value_node in node.value:
                if key_node.tag != _MERGE:
                    explicit.append((key_node, value_node))
                    continue
                subnodes = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for sub in subnodes:
                    if not isinstance(sub, yaml.MappingNode):
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"a merge key (<<) takes a mapping or a list of mappings, not a {sub.id}", sub.start_mark)
                    self.flatten_mapping(sub)
                for sub in reversed(subnodes):  # earlier mappings of the list win: they come later
                    merged.extend(sub.value)
            unique: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
            for key_node, value_node in merged:  # the last occurrence of a key is the one that wins
                ident = (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                unique.pop(ident, None)
                unique[ident] = (key_node, value_node)
            self.merged += len(unique)
            if self.merged > MAX_VALUES:
                raise _bomb()
            node.value = list(unique.values()) + explicit
            node.merged_count = len(unique)  # type: ignore[attr-defined]
        finally:
            self.flattening.discard(id(node))

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(None, None, f"expected a mapping, found a {node.id}", node.start_mark)
        self.flatten_mapping(node)
        first_explicit = getattr(node, "merged_count", 0)
        mapping: dict[Any, Any] = {}
        explicit: set[Any] = set()
        for index, (key_node, value_node) in enumerate(node.value):
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        "a key that is a list or a mapping", key_node.start_mark) from None
            if index >= first_explicit:
                if key in explicit:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {preview(key)} appears twice",
                                                            key_node.start_mark)
                explicit.add(key)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class ConfigDumper(yaml.SafeDumper):
    """yaml.SafeDumper that also quotes strings ConfigLoader would read as numbers (and those YAML 1.1
    readers would read as booleans), so a saved config reads back the same everywhere."""


for _cls in (ConfigLoader, ConfigDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
    _cls.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))


def _construct_int(loader: ConfigLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if len(text) > 30:  # Python refuses to parse over 4300 digits; no value this project reads needs 30
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(text)} digits is no config value",
                                                node.start_mark)
    try:
        return int(text)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{preview(text)} is not an integer", node.start_mark) from None


ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def expanded_size(data: Any, budget: int) -> int:
    """How many values `data` holds with every shared (aliased) object counted each time it appears;
    stops counting past `budget`. An alias bomb (`b: [*a, *a, ...]` nested 10 deep) loads as a small
    graph but is billions of values to anything that walks or prints it."""
    count, stack = 0, [data]
    while stack and count <= budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return count


def _yaml(text: str) -> Any:
    """ConfigLoader's reading of `text`; yaml.YAMLError for what YAML refuses, _Refused for the bounds."""
    try:
        data = yaml.load(text, Loader=ConfigLoader)
    except RecursionError:  # not expected below MAX_DEPTH; a bound either way
        raise _too_deep() from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, IndexError) as err:
        # a value of an explicit tag its constructor cannot read (`!!float abc`, `!!timestamp x`)
        raise yaml.YAMLError(f"a tagged value it cannot read ({type(err).__name__}: {str(err)[:100]})") from None
    if expanded_size(data, MAX_VALUES) > MAX_VALUES:
        raise _bomb()
    return data


def yaml_problem(err: yaml.YAMLError) -> str:
    """'is not valid YAML (line L, column C): problem', one line, from a PyYAML error."""
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
    return f"is not valid YAML{where}: {problem}"


def parse_yaml(text: str, what: str = "the YAML value") -> Any:
    """Parse YAML text with ConfigLoader (raises yaml.YAMLError for invalid YAML, so a caller may fall
    back to the raw text), refusing (UserError naming `what`) text over MAX_YAML_CHARS, nesting deeper than
    MAX_DEPTH and alias bombs."""
    if len(text) > MAX_YAML_CHARS:
        raise UserError(f"{what} is {len(text)} characters long; a config is at most {MAX_YAML_CHARS}")
    try:
        return _yaml(text)
    except _Refused as err:
        raise UserError(f"{what} {err.problem}") from None


# -- JSON --------------------------------------------------------------------------------------------

def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _Refused(f"is not valid JSON: the key {preview(key)} appears twice")
        data[key] = value
    return data


def _depth_ok(data: Any) -> bool:
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def _json(text: str) -> Any:
    """json.loads with duplicate keys, nesting and Python's integer digit limit refused as _Refused."""
    if not text.strip():
        raise _Refused("is empty: a JSON value was expected")
    try:
        data = json.loads(text, object_pairs_hook=_pairs)
    except json.JSONDecodeError as err:
        raise _Refused(f"is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError as err:  # an integer of over 4300 digits
        raise _Refused(f"is not valid JSON: {(str(err).splitlines() or ['a value it cannot read'])[0][:120]}") from None
    if not _depth_ok(data):
        raise _too_deep()
    return data


def parse_json(text: str, what: str, fix: str = "") -> Any:
    """One JSON value (a line of a .jsonl file, a small document) with the loader's checks, or a
    StructuredFileError naming `what`."""
    if len(text) > MAX_CHARS:
        raise StructuredFileError(what, f"is {len(text)} characters long; at most {MAX_CHARS} are read", fix)
    try:
        return _json(text)
    except _Refused as err:
        problem = err.problem if "\n" in text else err.problem.replace("(line 1, column", "(column")
        raise StructuredFileError(what, problem, fix) from None


# -- files -------------------------------------------------------------------------------------------

SHAPES: dict[type, str] = {dict: "a mapping", list: "a list"}


def _label(path: Path, kind: str) -> str:
    return f"{kind} {path}" if kind else str(path)


def read_text(path: str | Path, kind: str = "", max_chars: int = MAX_CHARS, fix: str = "") -> str:
    """The text of a UTF-8 file of at most `max_chars` characters, or a StructuredFileError naming it
    ("{kind} not found: PATH" when it is no regular file: a folder, a FIFO that would block the read)."""
    path = Path(path)
    label = _label(path, kind)
    if not path.is_file():
        raise UserError(f"{kind or 'file'} not found: {path}" + (f"; {fix}" if fix else ""))
    try:
        size = path.stat().st_size  # a regular file's size: a huge one is refused without reading it
        with path.open("rb") as f:
            raw = f.read(4 * max_chars + 1) if size <= 4 * max_chars else b""  # UTF-8: at most 4 bytes a character
    except OSError as err:
        raise UserError(f"cannot read {label}: {err.strerror or err}") from None
    if size > 4 * max_chars or len(raw) > 4 * max_chars:
        raise StructuredFileError(label, f"is over {4 * max_chars} bytes, more than the {max_chars} characters long "
                                         "such a file may be: is it the right file?", fix)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StructuredFileError(label, "is not a text file (not UTF-8): is it the right file?", fix) from None
    if len(text) > max_chars:
        raise StructuredFileError(label, f"is {len(text)} characters long; such a file is at most {max_chars} characters "
                                         "long: is it the right file?", fix)
    return text.removeprefix("\ufeff")  # a byte-order mark some editors write


def check_shape(data: Any, shape: type | None, label: str, expected: str = "", fix: str = "") -> Any:
    """`data` if it is a `shape` (dict or list), else a StructuredFileError: 'must hold <expected>, not a <type>'."""
    if shape is not None and not isinstance(data, shape):
        kind = "nothing (it is empty)" if data is None else f"a {type(data).__name__}"
        raise StructuredFileError(label, f"must hold {expected or SHAPES.get(shape, shape.__name__)}, not {kind}", fix)
    return data


def load_yaml(path: str | Path, kind: str = "", shape: type | None = dict, expected: str = "",
              empty: Any = None, max_chars: int = MAX_YAML_CHARS, fix: str = "") -> Any:
    """A YAML file through the loader: `empty` for a file with no document (if not None), else its
    value, checked to be a `shape`; any refusal is a one-line StructuredFileError naming the file."""
    path = Path(path)
    label = _label(path, kind)
    text = read_text(path, kind, max_chars, fix)
    try:
        data = _yaml(text)
    except _Refused as err:
        raise StructuredFileError(label, err.problem, fix) from None
    except yaml.YAMLError as err:
        raise StructuredFileError(label, yaml_problem(err), fix) from None
    if data is None and empty is not None:
        return empty
    return check_shape(data, shape, label, expected, fix)


def load_json(path: str | Path, kind: str = "", shape: type | None = dict, expected: str = "",
              max_chars: int = MAX_CHARS, fix: str = "") -> Any:
    """A JSON file through the loader, checked to be a `shape`, or a one-line StructuredFileError."""
    path = Path(path)
    label = _label(path, kind)
    text = read_text(path, kind, max_chars, fix)
    try:
        data = _json(text)
    except _Refused as err:
        raise StructuredFileError(label, err.problem, fix) from None
    return check_shape(data, shape, label, expected, fix)


def load_jsonl(path: str | Path, kind: str = "", shape: type | None = dict, expected: str = "",
               max_chars: int = 16 * MAX_CHARS, fix: str = "",
               check: Callable[[Any, str], None] | None = None) -> list[Any]:
    """The rows of a JSON-lines file (blank lines skipped), each checked to be a `shape` and by
    `check(row, label)`; a bad row is a StructuredFileError naming PATH:LINE."""
    path = Path(path)
    text = read_text(path, kind, max_chars, fix)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        label = f"{_label(path, kind)}:{number}"
        try:
            row = _json(line)
        except _Refused as err:
            raise StructuredFileError(label, err.problem.replace("(line 1, column", "(column"), fix) from None
        check_shape(row, shape, label, expected, fix)
        if check is not None:
            check(row, label)
        rows.append(row)
    return rows
