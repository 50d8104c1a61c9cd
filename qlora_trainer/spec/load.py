"""Reading a run specification: YAML files, `--set section.key=value` overrides, type coercion, renamed keys.

Everything is checked here, before any model is loaded, so a typo costs a second, not a model load. Errors are
`ConfigError` with a one-line message naming the key.
"""

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from qlora_trainer.errors import ConfigError
from qlora_trainer.spec.sections import RunSpec

# How a switch may be written; YAML 1.1 already reads the bare words as booleans, these are the quoted spellings.
_SWITCH_WORDS = {"true": True, "on": True, "false": False, "off": False}

# Keys renamed to peft's names; the old spelling still works, with a one-line notice.
RENAMED_KEYS = {"adapter.alpha": "adapter.lora_alpha", "adapter.dropout": "adapter.lora_dropout"}


def _type_name(tp: Any) -> str:
    if get_origin_safe(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def get_origin_safe(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    return Union if origin is types.UnionType else origin


def _takes_shape_of(tp: Any, value: Any) -> bool:
    """Whether `tp` is the list type for a list value, or the mapping type (dict or dataclass) for a mapping."""
    origin = get_origin_safe(tp)
    if isinstance(value, list):
        return origin is list
    return isinstance(value, dict) and (origin is dict or dataclasses.is_dataclass(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` and return it in that type, or raise ConfigError."""
    origin = get_origin_safe(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str) and value.strip().lower() in _SWITCH_WORDS:  # "true" / "false" for a switch
            value = _SWITCH_WORDS[value.strip().lower()]
        if isinstance(value, bool):  # YAML 1.1 reads bare on/off (and true/false) as booleans
            word = "on" if value else "off"
            if word in choices:
                return word
            raise ConfigError(f"{key}: {'true / on' if value else 'false / off'} is not allowed; choose one of "
                              f"{', '.join(map(str, choices))}")
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        shaped = [arg for arg in args if _takes_shape_of(arg, value)]
        if len(shaped) == 1:  # a list or mapping has one reading: its own error names the entry at fault
            return _coerce(key, value, shaped[0])
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {' or '.join(_type_name(a) for a in args)}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected a list")
        return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected a mapping, e.g. {{name: value}}")
        return {_coerce(key, name, key_type): _coerce(f"{key}.{name}", item, value_type)
                for name, item in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build_section(tp, key, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _SWITCH_WORDS:  # quoted, or from YAML 1.2 habits
            return _SWITCH_WORDS[value.strip().lower()]
        raise ConfigError(f"{key}: {value!r} is not allowed; expected true or false (or on / off)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not allowed; expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not allowed; expected a string")
    raise TypeError(f"unsupported config annotation {tp} for {key}")


def _build_section(section_cls: type, section_name: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section_name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"{section_name}.{key}: unknown key; valid keys of {section_name} are {', '.join(sorted(known))}"
            )
        values[key] = _coerce(f"{section_name}.{key}", value, hints[key])
    return section_cls(**values)


def rename_old_keys(raw: dict) -> dict:
    """A copy of `raw` with renamed keys under their new names, each noted once on stderr."""
    renamed = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for old, new in RENAMED_KEYS.items():
        section, old_name = old.split(".")
        values = renamed.get(section)
        if not isinstance(values, dict) or old_name not in values:
            continue
        new_name = new.split(".")[1]
        if new_name in values:
            raise ConfigError(f"{old}: set twice, also as {new}; keep only {new}")
        values[new_name] = values.pop(old_name)
        print(f"note: {old} is now called {new}; the old name still works", file=sys.stderr)
    return renamed


def spec_from_dict(raw: Any) -> RunSpec:
    """Build a validated RunSpec from a plain mapping (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections at the top level, got {type(raw).__name__}")
    raw = rename_old_keys(raw)
    sections = {f.name: f.type for f in dataclasses.fields(RunSpec) if f.name != "explicit_keys"}
    hints = typing.get_type_hints(RunSpec)
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"{name}: unknown section; valid sections are {', '.join(sections)}")
        built[name] = _build_section(hints[name], name, value)
    explicit = frozenset(f"{name}.{key}" for name, value in raw.items() if isinstance(value, dict) for key in value)
    spec = RunSpec(**built, explicit_keys=explicit)
    spec.validate()
    return spec


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into its key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. training.learning_rate=2e-4")
    key, _, value_text = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text}: KEY must be section.key, e.g. training.learning_rate")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `section.key=value` override applied."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        target = merged.setdefault(section, {})
        if target is None:
            target = merged[section] = {}
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {target!r}")
        target[key] = value
    return merged


class _DuplicateKey(Exception):
    def __init__(self, key: str, first_line: int, line: int):
        super().__init__(key)
        self.key, self.first_line, self.line = key, first_line, line


def _check_unique_keys(node: yaml.Node, path: str, seen_nodes: set[int]) -> None:
    """Raise _DuplicateKey for a key given twice in one mapping, anywhere under `node`."""
    if id(node) in seen_nodes:  # an alias to a node already walked (or a recursive one)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, path, seen_nodes)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` then a key: an override, as YAML means it
            continue
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(id(key_node))
        key = f"{path}.{name}" if path else name
        line = key_node.start_mark.line + 1
        if name in lines:
            raise _DuplicateKey(key, lines[name], line)
        lines[name] = line
        _check_unique_keys(value_node, key, seen_nodes)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping. Plain YAML keeps the last silently, so a repeated
    `training:` section would drop the whole first one."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(node, "", set())
        return super().construct_document(node)


def read_yaml(path: Path) -> dict:
    """Read a YAML config file into a mapping, with one-line errors for a missing or malformed file."""
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as dup:
        raise ConfigError(f"{dup.key}: given twice in {path}, at lines {dup.first_line} and {dup.line}; keep one "
                          "(YAML would silently drop the first)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"--config {path}: malformed YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections at the top level")
    return raw


def _beside(value: Optional[str], base_dir: Path) -> Optional[str]:
    """`value`, or the path under base_dir where only that one exists."""
    if not value or Path(value).is_absolute() or Path(value).exists() or not (base_dir / value).exists():
        return value
    return str(base_dir / value)


def resolve_relative_paths(spec: RunSpec, base_dir: Path) -> None:
    """Make model/data paths that name existing files relative to the config file usable from any cwd."""
    spec.model.path = _beside(spec.model.path, base_dir)
    spec.model.tokenizer_path = _beside(spec.model.tokenizer_path, base_dir)
    data = spec.data
    data.path = (_beside(data.path, base_dir) if isinstance(data.path, str) else
                 [_beside(entry, base_dir) if isinstance(entry, str) else
                  dataclasses.replace(entry, path=_beside(entry.path, base_dir)) for entry in data.path])


def load_spec(path: Path, overrides: list[str] = (), output_dir: Optional[str] = None) -> RunSpec:
    """Read YAML, apply `--set` overrides and `--output-dir`, build and validate the RunSpec."""
    raw = apply_overrides(read_yaml(Path(path)), list(overrides))
    if output_dir is not None:
        raw.setdefault("output", {})
        raw["output"] = dict(raw["output"] or {}, dir=output_dir)
    spec = spec_from_dict(raw)
    resolve_relative_paths(spec, Path(path).resolve().parent)
    return spec


def spec_to_dict(spec: RunSpec) -> dict:
    """Plain mapping of the spec's sections, for saving beside a run."""
    raw = dataclasses.asdict(spec)
    raw.pop("explicit_keys")
    return raw
