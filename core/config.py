"""YAML configs with dotted `key=value` overrides, validated by the pydantic models in data_schemas.

Overrides are written `train.learning_rate=1e-4`, or in the transformers/TRL habit `--train.learning_rate 1e-4`,
`--learning_rate=1e-4` (the CLI turns those into the first form: align/cli.py). Values are parsed as YAML scalars,
so `true`, `3`, `1e-4`, `[a, b]` work; `1e-4` is a number in files too (YAML 1.1 would read it as a string). A key
that is not the config's is resolved the way a TRL user means it (`resolve_key`): TRL's own name where align's
differs (`TRL_NAMES`: `lora_r`, `num_generations`, ...), or a field name that exists once in the config
(`learning_rate` is `train.learning_rate`). Every problem becomes one line naming where the key came from (the
file or the command line), the key, what is allowed and, for an unknown key, the nearest real ones; the CLI prints
them and exits 2. `config_help` lists every key with its default and description for `--help`.
"""

from __future__ import annotations

import difflib
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined, to_jsonable_python
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


# YAML 1.2's floats: PyYAML (YAML 1.1) wants a dot in the mantissa and a sign in the exponent, so `1e-4` and `3e5`
# were strings. Added after PyYAML's own float rule, which still reads everything it read before.
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


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


def override_keys(overrides: list[str], model: type[BaseModel] | None = None) -> list[str]:
    """The dotted keys `overrides` set (resolved against `model` as apply_overrides resolves them)."""
    keys = [item.split("=", 1)[0].strip().removeprefix("--") for item in overrides if "=" in item]
    return [resolve_key(model, k) if model is not None else k for k in keys]


def apply_overrides(
    data: dict[str, Any], overrides: list[str], model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides in order; values are YAML scalars or flow collections. With `model`, a key it
    does not have is resolved as a TRL user means it (`resolve_key`)."""
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
        key = resolve_key(model, key) if model is not None else key
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


# ----------------------------------------------------------------------------------------------------------
# The keys of a config model: resolution, suggestions, help
# ----------------------------------------------------------------------------------------------------------
# TRL's (and transformers') names where align's key differs, for the configs that have the key: TRL name -> align's
# dotted keys, the first one the config has wins. Names that exist once in a config need no row (`resolve_key`).
TRL_NAMES: dict[str, tuple[str, ...]] = {
    "lora_r": ("lora.r",),
    "lora_alpha": ("lora.alpha",),
    "lora_dropout": ("lora.dropout",),
    "lora_target_modules": ("lora.target_modules",),
    "use_peft": ("lora.enabled",),
    "model_name_or_path": ("model.name_or_path", "init_from"),
    "num_ppo_epochs": ("train.ppo_epochs",),
    "cliprange": ("train.clip_range",),
    "cliprange_value": ("train.clip_range_value",),
    "num_generations": ("train.group_size",),
    "max_completion_length": ("rollout.max_new_tokens",),
    "beta": ("train.beta", "train.kl_coef"),  # DPO's beta; GRPO's is the KL coefficient
}


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation holds (itself, or inside Optional/Union/list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for t in typing.get_args(annotation) for m in _models_in(t)]


def _mapping_of(annotation) -> type[BaseModel] | None:
    """The model a mapping field holds under keys of the user's (`dict[str, SweepParam]`), else None."""
    if typing.get_origin(annotation) is dict:
        models = _models_in(typing.get_args(annotation)[-1])
        return models[0] if models else None
    found = [m for t in typing.get_args(annotation) if (m := _mapping_of(t)) is not None]
    return found[0] if found else None


def _extra_model(model: type[BaseModel]) -> type[BaseModel] | None:
    """The model a config's extra keys hold (`extra="allow"` with `__pydantic_extra__: dict[str, X]`), else None."""
    if model.model_config.get("extra") != "allow":
        return None
    return _mapping_of(typing.get_type_hints(model).get("__pydantic_extra__"))


def config_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, pydantic FieldInfo) of every leaf of `model`, in declaration order (nested models walked; a
    mapping of models, or a model's extra keys, shown as `<name>`)."""
    out = []
    extra = _extra_model(model)
    if extra is not None:
        out += config_fields(extra, f"{prefix}<name>.")
    for name, f in model.model_fields.items():
        mapped = _mapping_of(f.annotation)
        subs = _models_in(f.annotation)
        if mapped is not None:
            out += config_fields(mapped, f"{prefix}{name}.<name>.")
        elif subs:
            out += config_fields(subs[0], f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", f))
    return out


def _known(model: type[BaseModel], key: str) -> bool:
    """Whether `key` names a field of `model` (or something inside a field that is not a model: a mapping, a
    config's extra keys)."""
    models = [model]
    for part in key.split("."):
        if not models or any(m.model_config.get("extra") == "allow" for m in models):
            return True  # below a leaf, or among a config's own keys: the validators decide
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            return False
        if any(_mapping_of(f.annotation) is not None for f in fields):
            return True
        models = [s for f in fields for s in _models_in(f.annotation)]
    return True


def resolve_key(model: type[BaseModel], key: str) -> str:
    """The config key a user means: `key` when `model` has it; else TRL's name for it (TRL_NAMES); else, for a
    plain name, the one field of `model` with that name at any depth (`learning_rate`: `train.learning_rate`);
    else `key` as given (validation then says it is unknown, with the nearest keys)."""
    if _known(model, key):
        return key
    for candidate in TRL_NAMES.get(key, ()):
        if _known(model, candidate):
            return candidate
    if "." not in key:  # a training setting's name: gate and evaluation sections are not what TRL names
        named = [k for k, _ in config_fields(model) if k.rsplit(".", 1)[-1] == key and not _judging(k)]
        if len(named) == 1:
            return named[0]
    return key


def _judging(key: str) -> bool:
    """A key of a gate's or an evaluation's section (`perplexity_gate.max_length`, `eval.prompts`)."""
    top = key.split(".", 1)[0]
    return top.endswith("gate") or top in ("eval", "gates")


def suggestions(model: type[BaseModel], key: str) -> list[str]:
    """The real keys nearest to an unknown `key`: same last name elsewhere, then close spellings."""
    keys = [k for k, _ in config_fields(model) if "<name>" not in k]
    leaf = key.rsplit(".", 1)[-1]
    same = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    for cutoff, n in ((0.85, 1), (0.6, 2)):  # one clear match, else the two nearest
        close = difflib.get_close_matches(key, keys, n=n, cutoff=cutoff)
        close += [
            by_leaf[x] for x in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=cutoff + 0.1)
        ]
        if same or close:
            return list(dict.fromkeys(same + close))[:3]
    return []


def _default(f) -> str:
    if f.default is not PydanticUndefined:
        value = f.default
    elif f.default_factory is not None:
        try:
            value = f.default_factory()
        except TypeError:
            return "(computed)"
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "(a section)"
    try:
        value = to_jsonable_python(value)  # paths, enums, ... as the YAML a user would write
        text = (
            yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
        )
    except (TypeError, ValueError, yaml.YAMLError):
        text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def config_help(model: type[BaseModel], width: int = 100) -> str:
    """Every key of `model` with its default and description, for a command's --help (as TRL's CLI lists its
    dataclass fields)."""
    lines = ["config keys (KEY=VALUE after the command, or in --config's YAML; default in parentheses):"]
    for key, f in config_fields(model):
        lines.append(f"  {key} ({_default(f)})")
        if f.description:
            lines += textwrap.wrap(f.description, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def format_validation_error(
    err: ValidationError,
    source: str,
    model: type[BaseModel] | None = None,
    overridden: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """One line per problem: where the key came from (`source`, or the command line for a key in `overridden` and
    what is below it), the key, what is wrong; for an unknown key of `model`, the nearest real keys."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        given = any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in overridden)
        where = "command line" if given else source
        if e["type"] == "extra_forbidden":
            near = suggestions(model, key) if model is not None else []
            msg = (
                f"unknown key; did you mean {' or '.join(near)}?"
                if near
                else "unknown key (check the spelling; `align COMMAND --help` lists every key)"
            )
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "literal_error":
            msg = f"{e['msg'].replace('Input should be', 'must be')}; got {e.get('input')!r}"
        else:
            msg = f"{e['msg']}; got {e.get('input')!r}"
        msg = msg.replace("Value error, ", "")
        lines.append(f"{where}: {key}: {msg}")
    return lines


def load_config(model: type[T], path: Path | None, overrides: list[str] | None = None) -> T:
    """Read YAML (optional), apply overrides, validate. Raises UserError listing every problem."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [], model)
    source = str(path) if path is not None else "command line"
    return validate(model, data, source, override_keys(overrides or [], model))


def validate(model: type[T], data: dict[str, Any], source: str, overridden: list[str] | tuple = ()) -> T:
    """The config model from a mapping, or a UserError with one line per problem naming where its key came from
    (`source`, or the command line for the keys in `overridden`) and the key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError("\n".join(format_validation_error(e, source, model, overridden))) from None
    except RecursionError:
        raise UserError(f"{source}: a value is nested too deeply to validate") from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
