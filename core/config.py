"""YAML configs with dotted `key=value` overrides, validated by the pydantic models in data_schemas.

Overrides follow the transformers/TRL habit of `--key value` on the command line, written here as
`train.learning_rate=1e-4` (values are parsed as YAML scalars, so `true`, `3`, `1e-4`, `[a, b]` work).
Every problem becomes one line naming the file, the key and what is allowed; the CLI prints them and exits 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from rich.markup import escape

T = TypeVar("T", bound=BaseModel)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """User text made inert for a terminal: Rich markup escaped (a '[/]' in a ranking file is text, not a closing
    tag) and control characters (ESC, BEL, ...) shown as \\xNN, so no file can move the cursor or recolour the
    screen of the person reading align's output."""
    return escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text)))


class UserError(Exception):
    """A problem the user can fix (bad config, bad input, missing file). Printed without a traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


MAX_ALIASES = (
    100  # anchors may be reused this often in one document: configs need a few, a "billion laughs" millions
)
MAX_NODES = 200_000  # values in the document once every alias is expanded (what the validators will walk)
MAX_DEPTH = 50  # nesting of mappings and lists: align's deepest config is 4 levels
MAX_KEY_PARTS = 16  # parts of a dotted override key


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with limits: a duplicate key is an error (the second silently won), aliases are
    budgeted (an alias bomb took 84 s and 3.4 GB, then MemoryError) and nesting is bounded (deep YAML overflowed the
    stack). Each refusal is a YAML error with the line, which read_yaml turns into one sentence."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"more than {MAX_ALIASES} aliases (*name): refused",
                    self.peek_event().start_mark,
                )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels: refused",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            sizes: dict[int, int] = {}

            def expanded(
                n,
            ) -> int:  # memoised by node: linear in the document, whatever the aliases multiply to
                if id(n) not in sizes:
                    sizes[id(n)] = 0  # a recursive alias counts once
                    kids = [x for kv in n.value for x in kv] if isinstance(n, yaml.MappingNode) else (
                        n.value if isinstance(n, yaml.SequenceNode) else [])  # fmt: skip
                    sizes[id(n)] = min(MAX_NODES + 1, 1 + sum(expanded(k) for k in kids))
                return sizes[id(n)]

            if expanded(node) > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"expands to more than {MAX_NODES} values through its aliases: refused",
                    node.start_mark,
                )
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (the later one would silently win)",
                    key_node.start_mark,
                )
            seen.add(key) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep=deep)


def strict_yaml(text: str) -> Any:
    """YAML text parsed by `StrictLoader` (yaml.YAMLError on a duplicate key, an alias bomb or deep nesting)."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = strict_yaml(text)
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to read") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: the top level must be a mapping of keys to values, not {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides in order; values are YAML scalars or flow collections."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}': expected key=value, e.g. train.learning_rate=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("--")
        if not key:
            raise UserError(f"override '{item}': the key is empty")
        if key.count(".") >= MAX_KEY_PARTS:
            raise UserError(f"override '{item[:80]}…': the key has more than {MAX_KEY_PARTS} parts")
        try:
            value = strict_yaml(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError) as e:
            if "refused" in str(e) or "duplicate key" in str(e) or isinstance(e, RecursionError):
                raise UserError(
                    f"override {key}: {getattr(e, 'problem', None) or 'nested too deeply'}"
                ) from None
            value = raw
        set_dotted(data, key, value)
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data["a"]["b"]["c"] = value for key "a.b.c", copying (never mutating) the nested mappings on the way."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        child = node.get(p)
        node[p] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    node[parts[-1]] = value


def format_validation_error(err: ValidationError, source: str) -> list[str]:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the documented keys in configs/ and docs/configuration.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "literal_error":
            msg = f"{e['msg'].replace('Input should be', 'must be')}; got {e.get('input')!r}"
        else:
            msg = f"{e['msg']}; got {e.get('input')!r}"
        msg = msg.replace("Value error, ", "")
        lines.append(f"{source}: {key}: {msg}")
    return lines


def load_config(model: type[T], path: Path | None, overrides: list[str] | None = None) -> T:
    """Read YAML (optional), apply overrides, validate. Raises UserError listing every problem."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate(model, data, str(path) if path is not None else "command line")


def validate(model: type[T], data: dict[str, Any], source: str) -> T:
    """The config model from a mapping, or a UserError with one line per problem naming source and key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError("\n".join(format_validation_error(e, source))) from None
    except RecursionError:
        raise UserError(f"{source}: a value is nested too deeply to validate") from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
