"""Typed configs as the one source of every setting: a plain (possibly nested) dataclass gives
the command line, the config files (TOML, YAML) and the settings a checkpoint stores back.

One leaf field is one option. Its command-line name is ``metadata["option"]`` or ``--`` + the
field name with ``_`` -> ``-``; nested dataclasses flatten without prefixes (a clash is a
``TypeError`` when the options are built), and in files they are tables (``[model.recurrent]``).
The annotation decides how a value is read:

    int, float, str          one value
    bool                     --x / --no-x (argparse.BooleanOptionalAction); true/false in files
    X | None                 also the word ``none`` (TOML has no null; YAML's null works too)
    list[int|float|str]      comma-separated on the command line, an array in files
    Literal[...]             choices (or ``metadata["choices"]``)

and metadata refine it: ``"check"`` (a name of `CHECKS`: ``"positive"``, ``"probability"``,
``"positive_real"``, ``"nonnegative"``, ``"seed"``, or a `Check`), ``"parse"`` (text -> value,
raising ``argparse.ArgumentTypeError``; with ``"nargs": "+"`` a list option takes one or more
words, each one item read by ``"parse"``), ``"choices"``, ``"positional"`` (nargs="?"),
``"cli": False`` (files and print-config only), ``"metavar"`` and ``"help"``. The help of an
option is the field's trailing ``# comment`` in the dataclass source (continuation comment lines
indented below it included) and its default.

Resolution order: the dataclass defaults (or the caller's ``defaults`` instance) < ``--config
FILE`` < the command line; the argparse defaults are a sentinel, so what the user gave is known.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import importlib.metadata
import inspect
import io
import math
import reprlib
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli backport
    import tomli as tomllib  # type: ignore[no-redef]

# Sizes and counts end up in torch's int64 (shapes, loop bounds); larger ones overflow deep in
# torch with an unrelated message, so the parsers refuse them by name.
LARGEST_COUNT = 2**63 - 1

# torch.manual_seed takes a 64-bit integer; numpy's generators and Python's hash of the seed
# agree on the non-negative half, the range every command documents.
SEED_RANGE = (0, 2**63 - 1)

CONFIG_FILE_DEST = "config_file"
"""The namespace attribute of ``--config FILE`` (None when not given)."""
PRINT_CONFIG_DEST = "print_config"
"""The namespace attribute of ``--print-config``: the caller prints `config_to_toml` and exits 0."""

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")
NONE_WORD = "none"
"""How None is written on the command line and in files (TOML has no null)."""


# --- checks: one accepted range, one wording, on the command line, in files and in code ------

@dataclass(frozen=True)
class Check:
    """A range a value must lie in, with the words that describe it.

    ``kind`` is the Python type the value has (int, or float: ints are accepted and widened);
    ``accepted`` completes "expected ...", ``accepted_plural`` "comma-separated ..."; with
    ``names_option`` the command line says "--seed takes <accepted>" instead of "expected".
    """

    kind: type
    accepted: str
    accepted_plural: str
    test: Callable[[Any], bool]
    names_option: bool = False


CHECKS: dict[str, Check] = {
    "positive": Check(int, "a positive int (at most 2**63 - 1)",
                      "positive ints (at most 2**63 - 1)", lambda v: 1 <= v <= LARGEST_COUNT),
    "seed": Check(int, "an integer in [0, 2**63 - 1]", "integers in [0, 2**63 - 1]",
                  lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1], names_option=True),
    "nonnegative": Check(float, "a number >= 0", "numbers >= 0", lambda v: v >= 0),
    "positive_real": Check(float, "a finite number > 0", "finite numbers > 0",
                           lambda v: v > 0 and not math.isinf(v)),
    "probability": Check(float, "a number in [0, 1]", "numbers in [0, 1]",
                         lambda v: 0 <= v <= 1),
}
"""The common ranges, by the name ``metadata["check"]`` gives."""


def _number(kind: type, text: str) -> int | float | bool | None:
    """``text`` as a ``kind`` (int, float, or bool from true/false), None if it is not one."""
    if kind is bool:
        return {"true": True, "false": False}.get(text.strip().lower())
    try:
        return kind(text)
    except ValueError:
        return None


def _parse_checked(check: Check, text: str, option: str) -> int | float:
    value = _number(check.kind, text)
    if value is None or not check.test(value):
        said = f"{option} takes" if check.names_option else "expected"
        raise argparse.ArgumentTypeError(f"{said} {check.accepted}, got {text!r}")
    return value


def _parse_checked_list(check: Check, text: str, option: str) -> list:
    values = [_number(check.kind, item) for item in text.split(",") if item.strip()]
    if not values or not all(v is not None and check.test(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"{option} takes comma-separated {check.accepted_plural}, got {text!r}")
    return values


def parse_positive(text: str) -> int:
    """An int in [1, 2**63 - 1] (a size or a count)."""
    return _parse_checked(CHECKS["positive"], text, "")  # type: ignore[return-value]


def parse_nonnegative(text: str) -> float:
    """A number >= 0 (infinity included)."""
    return _parse_checked(CHECKS["nonnegative"], text, "")


def parse_positive_real(text: str) -> float:
    """A finite number > 0."""
    return _parse_checked(CHECKS["positive_real"], text, "")


def parse_probability(text: str) -> float:
    """A number in [0, 1]."""
    return _parse_checked(CHECKS["probability"], text, "")


def parse_seed(text: str, option: str = "--seed") -> int:
    """A seed in [0, 2**63 - 1]."""
    return _parse_checked(CHECKS["seed"], text, option)  # type: ignore[return-value]


def parse_seeds(text: str, option: str = "--seed") -> list[int]:
    """Comma-separated seeds, each as `parse_seed` (at least one)."""
    return _parse_checked_list(CHECKS["seed"], text, option)


def parse_bound_or_off(text: str) -> float | None:
    """A clipping bound: a number > 0, or 0 for off (None)."""
    value = parse_nonnegative(text)
    return value or None


def parse_season(text: str) -> int:
    """A season length >= 2, or 0 for none."""
    value = _number(int, text)
    if value is None or value < 0 or value == 1 or value > LARGEST_COUNT:
        raise argparse.ArgumentTypeError(
            f"--season takes a season length >= 2, or 0 for none, got {text!r}")
    return value


def parse_columns(text: str) -> list[str]:
    """Comma-separated names, blanks stripped (at least one)."""
    columns = [c.strip() for c in text.split(",") if c.strip()]
    if not columns:
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    return columns


def parse_integers(smallest: int, option: str) -> Callable[[str], list[int]]:
    """A parser of comma-separated integers in [smallest, 2**63 - 1] (at least one)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < smallest or max(values) > LARGEST_COUNT:
            raise argparse.ArgumentTypeError(
                f"{option} takes comma-separated integers in [{smallest}, 2**63 - 1], got "
                f"{text!r}")
        return values
    return parse


# --- the leaves of a config tree --------------------------------------------------------------

SCALARS = (int, float, str, bool)
_TYPE_WORDS = {int: ("an int", "ints"), float: ("a number", "numbers"),
               str: ("a string", "strings"), bool: ("true or false", "booleans")}


@dataclass(frozen=True)
class Leaf:
    """One setting: where it sits in the tree, how it is read and what it is called."""

    path: tuple[str, ...]  # field names from the root, e.g. ("model", "recurrent", "hidden_size")
    field: dataclasses.Field
    base: type  # int, float, str or bool: of the value, or of each element of a list
    optional: bool  # X | None
    is_list: bool
    choices: tuple | None
    check: Check | None
    parse: Callable[[str], Any] | None  # a custom command-line parser
    option: str | None  # "--hidden"; None with metadata["cli"] = False
    positional: bool
    metavar: str
    comment: str  # from the dataclass source

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def label(self) -> str:
        """How messages name it: the option, else the positional's metavar, else the path."""
        if self.positional:
            return self.metavar
        return self.option or self.dotted

    def read(self, config: Any) -> Any:
        for name in self.path:
            config = getattr(config, name)
        return config


class _Unset:
    """The argparse default of every generated option: tells "not given" from any value."""

    def __repr__(self) -> str:
        return "<not given>"


UNSET = _Unset()


def _is_dataclass_type(kind: object) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _describe_type(kind: object) -> str:
    return getattr(kind, "__name__", None) or repr(kind)


def _analyse_type(owner: str, kind: object) -> tuple[type, bool, bool, tuple | None]:
    """An annotation -> (base, optional, is_list, choices), or TypeError for what is unsupported."""
    optional = False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(kind) if m is not type(None)]
        optional = len(members) < len(typing.get_args(kind))
        if len(members) != 1:
            raise TypeError(f"{owner}: a union other than `X | None` is not supported, got "
                            f"{kind}")
        kind = members[0]
    is_list = typing.get_origin(kind) is list
    if is_list:
        (kind,) = typing.get_args(kind) or (None,)
    choices = None
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1 or not kinds <= {int, str}:
            raise TypeError(f"{owner}: Literal choices must be all str or all int, got {choices}")
        (kind,) = kinds
    if kind not in SCALARS or (kind is bool and (is_list or optional)):
        raise TypeError(
            f"{owner}: unsupported annotation {_describe_type(kind)}; accepted: int, float, str, "
            "bool, Literal[...], list[int|float|str], X | None (not for bool), or a dataclass")
    return kind, optional, is_list, choices  # type: ignore[return-value]


def _option_name(field: dataclasses.Field) -> str:
    return field.metadata.get("option", "--" + field.name.replace("_", "-"))


@cache
def _own_comments(cls: type) -> dict[str, str]:
    """Field name -> its trailing comment in ``cls``'s source (empty without a source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    comments: dict[int, tuple[int, str]] = {}  # line -> (column, text)
    code_lines: set[int] = set()
    for token in tokens:
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.start[1], token.string.lstrip("#").strip())
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                                tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    found: dict[str, str] = {}
    class_node = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    for node in class_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        end = node.end_lineno or node.lineno
        parts = [comments[line][1] for line in range(node.lineno, end + 1) if line in comments]
        # A comment on the lines below, indented past the field, continues this one; one at
        # the field's own indentation introduces the next field.
        line = end + 1
        while line in comments and line not in code_lines and \
                comments[line][0] > node.col_offset:
            parts.append(comments[line][1])
            line += 1
        # Tool directives are not help.
        parts = [p for p in parts if p and not p.startswith(("noqa", "type:", "pragma"))]
        found[node.target.id] = " ".join(parts)
    return found


def _comments(cls: type) -> dict[str, str]:
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment replaces its base's
        if dataclasses.is_dataclass(klass):
            comments.update(_own_comments(klass))
    return comments


@cache
def _children(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """(field, resolved annotation) of each field of the dataclass ``cls``."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as error:
        raise TypeError(f"{cls.__name__}: cannot resolve an annotation ({error}); a config's "
                        "field types must be importable from its module") from None
    for field in dataclasses.fields(cls):
        if not field.init:
            raise TypeError(f"{cls.__name__}.{field.name}: fields with init=False are not "
                            "supported in configs (they cannot be read back)")
    return tuple((field, hints[field.name]) for field in dataclasses.fields(cls))


def leaves(config_type: type, exclude: frozenset[str] | set[str] = frozenset()
           ) -> tuple[Leaf, ...]:
    """Every leaf setting of the config tree rooted at ``config_type``, in field order, less
    those whose dotted path is in ``exclude`` (settings a command fixes itself: neither an
    option nor a key of its files).

    Raises TypeError for an unsupported annotation or metadata, for an ``exclude`` path that is
    no leaf, and for two leaves (or a leaf and ``--config`` / ``--print-config``) that would take
    the same command-line option.
    """
    return _leaves(config_type, frozenset(exclude))


@cache
def _all_leaves(config_type: type) -> tuple[Leaf, ...]:
    """Every leaf, excluded or not, without the check of option names (validation, files)."""
    if not _is_dataclass_type(config_type):
        raise TypeError(f"config_type must be a dataclass type, got {config_type!r}")
    found: list[Leaf] = []
    _collect(config_type, (), found)
    return tuple(found)


@cache
def _leaves(config_type: type, exclude: frozenset[str]) -> tuple[Leaf, ...]:
    found = list(_all_leaves(config_type))
    unknown = exclude - {leaf.dotted for leaf in found}
    if unknown:
        raise TypeError(f"exclude names no setting of {config_type.__name__}: "
                        f"{', '.join(sorted(unknown))}")
    found = [leaf for leaf in found if leaf.dotted not in exclude]
    taken: dict[str, str] = {"--config": "(--config FILE)", "--print-config": "(--print-config)",
                             CONFIG_FILE_DEST: "(--config FILE)",
                             PRINT_CONFIG_DEST: "(--print-config)"}
    for leaf in found:
        if leaf.option is None:
            continue
        names = [leaf.dotted] if leaf.positional else [leaf.option, leaf.dotted]
        if leaf.base is bool:
            names.append("--no-" + leaf.option[2:])
        for name in names:
            if name in taken:
                raise TypeError(
                    f"config fields {taken[name]} and {leaf.dotted!r} of {config_type.__name__} "
                    f"would both take {name}; give one of them metadata['option']")
            taken[name] = repr(leaf.dotted)
    return tuple(found)


def _collect(cls: type, prefix: tuple[str, ...], found: list[Leaf]) -> None:
    comments = _comments(cls)
    for field, kind in _children(cls):
        path = (*prefix, field.name)
        if _is_dataclass_type(kind):
            _collect(kind, path, found)
            continue
        owner = f"{cls.__name__}.{field.name}"
        base, optional, is_list, choices = _analyse_type(owner, kind)
        metadata = field.metadata
        choices = tuple(metadata["choices"]) if "choices" in metadata else choices
        check = metadata.get("check")
        if isinstance(check, str):
            if check not in CHECKS:
                raise TypeError(f"{owner}: unknown metadata['check'] {check!r}; accepted: "
                                f"{', '.join(CHECKS)}, or a Check")
            check = CHECKS[check]
        if check is not None and not (isinstance(check, Check) and check.kind is base):
            raise TypeError(f"{owner}: metadata['check'] {metadata['check']!r} is for "
                            f"{_describe_type(getattr(check, 'kind', None))} values, not "
                            f"{_describe_type(base)}")
        positional = bool(metadata.get("positional", False))
        if positional and base is bool:
            raise TypeError(f"{owner}: a bool cannot be positional")
        if "nargs" in metadata and not (is_list and "parse" in metadata):
            raise TypeError(f"{owner}: metadata['nargs'] is for a list with metadata['parse']")
        on_cli = metadata.get("cli", True)
        # Named after the option (--hidden HIDDEN), as argparse names its own.
        default_metavar = _option_name(field)[2:].replace("-", "_").upper() + (
            ",..." if is_list else "")
        if choices is not None and not is_list:
            default_metavar = "{" + ",".join(str(c) for c in choices) + "}"
        found.append(Leaf(
            path=path, field=field, base=base, optional=optional, is_list=is_list,
            choices=choices, check=check, parse=metadata.get("parse"),
            option=_option_name(field) if on_cli else None, positional=positional,
            metavar=metadata.get("metavar", default_metavar),
            comment=metadata.get("help", comments.get(field.name, ""))))


# --- values: text <-> value, and the one validation ------------------------------------------

def format_value(leaf: Leaf, value: Any) -> str:
    """A value as the command line writes it (``none``, true/false, comma-joined lists)."""
    if value is None:
        return NONE_WORD
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(format_value(leaf, item) for item in value)
    return repr(value) if isinstance(value, float) else str(value)


def _scalar_from_text(leaf: Leaf, text: str, option: str) -> Any:
    if leaf.check is not None:
        value = _parse_checked(leaf.check, text, option)
        return float(value) if leaf.base is float else value
    if leaf.base is str:
        value = text
    else:
        value = _number(leaf.base, text)
        if value is None:
            raise argparse.ArgumentTypeError(f"expected {_TYPE_WORDS[leaf.base][0]}, got {text!r}")
    if leaf.choices is not None and value not in leaf.choices:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(map(str, leaf.choices))})")
    return value


def parse_text(leaf: Leaf, text: str) -> Any:
    """Command-line text -> the leaf's value, or ``argparse.ArgumentTypeError`` saying why."""
    if leaf.optional and text.strip().lower() == NONE_WORD:
        return None
    if leaf.parse is not None:
        return leaf.parse(text)
    if not leaf.is_list:
        return _scalar_from_text(leaf, text, leaf.label)
    if leaf.check is not None:
        values = _parse_checked_list(leaf.check, text, leaf.label)
        return [float(v) for v in values] if leaf.base is float else values
    items = [item.strip() for item in text.split(",") if item.strip()]
    if leaf.choices is not None:
        if not items or any(item not in map(str, leaf.choices) for item in items):
            raise argparse.ArgumentTypeError(
                f"{leaf.label} takes a comma-separated subset of "
                f"{','.join(map(str, leaf.choices))}, got {text!r}")
    try:
        return [_scalar_from_text(leaf, item, leaf.label) for item in items]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{leaf.label} takes comma-separated {_TYPE_WORDS[leaf.base][1]}, got {text!r}"
        ) from None


def _expected(leaf: Leaf) -> str:
    if leaf.check is not None:
        words = f"a list of {leaf.check.accepted_plural}" if leaf.is_list else leaf.check.accepted
    elif leaf.choices is not None:
        accepted = ", ".join(repr(c) for c in leaf.choices)
        words = f"a list of values among {accepted}" if leaf.is_list else f"one of {accepted}"
    else:
        single, plural = _TYPE_WORDS[leaf.base]
        words = f"a list of {plural}" if leaf.is_list else single
    return f"{words}, or {NONE_WORD}" if leaf.optional else words


# A value from a file is shown in a message at a bounded size: a YAML file's aliases can nest a
# list that is billions of items long when written out (and cheap to load, being references).
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict = 2, 8, 8, 8
_SHOWN.maxstring, _SHOWN.maxlong, _SHOWN.maxother = 200, 100, 200


def _shown(value: Any) -> str:
    return _SHOWN.repr(value)


def _refuse(leaf: Leaf, value: Any) -> ValueError:
    return ValueError(f"{leaf.label} must be {_expected(leaf)}, got {_shown(value)}")


def _scalar_value(leaf: Leaf, value: Any) -> Any:
    if isinstance(value, bool) and leaf.base is not bool:
        raise _refuse(leaf, value)
    if leaf.base is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, leaf.base):
        raise _refuse(leaf, value)
    if leaf.choices is not None and value not in leaf.choices:
        raise _refuse(leaf, value)
    if leaf.check is not None and not leaf.check.test(value):
        raise _refuse(leaf, value)
    return value


def validate_value(leaf: Leaf, value: Any) -> Any:
    """A value from code, a file or a checkpoint -> the leaf's value (ints widened to float,
    the word ``none`` to None, tuples to lists), or ValueError naming the option and the value.
    """
    if leaf.optional and (value is None or isinstance(value, str) and
                          value.strip().lower() == NONE_WORD):
        return None
    if leaf.is_list:
        if not isinstance(value, list | tuple):
            raise _refuse(leaf, value)
        try:
            converted = [_scalar_value(leaf, item) for item in value]
        except ValueError:
            raise _refuse(leaf, value) from None  # the whole value: where it sits is clear
        if not converted and (leaf.check is not None or leaf.choices is not None):
            raise _refuse(leaf, value)  # as on the command line: a subset or range of one+
    else:
        converted = _scalar_value(leaf, value)
    if leaf.parse is not None and not (leaf.is_list and not converted):
        # (An empty list is a default no command line spells, e.g. no --features.)
        # The custom parser defines what is accepted on the command line; a value from
        # elsewhere is held to the same rule through its command-line text.
        items = converted if leaf.field.metadata.get("nargs") else [converted]
        try:
            for item in items:  # with nargs, the parser reads one item (one word)
                leaf.parse(format_value(leaf, item))
        except argparse.ArgumentTypeError as error:
            raise ValueError(_named(leaf, error)) from None
    return converted


def _named(leaf: Leaf, error: Exception) -> str:
    """A parser's message, prefixed with the setting unless it names it already."""
    message = str(error)
    return message if message.startswith(leaf.label) else f"{leaf.label}: {message}"


def _value_from_file(leaf: Leaf, value: Any) -> Any:
    """As `validate_value`; a string for a non-string setting is read as on the command line
    (YAML reads ``1e-3`` as a string; ``seed = "1,2"`` is the command line's form)."""
    if isinstance(value, str) and leaf.base is not str and not (
            leaf.optional and value.strip().lower() == NONE_WORD):
        try:
            value = parse_text(leaf, value)
        except argparse.ArgumentTypeError as error:
            if leaf.parse is None:
                raise _refuse(leaf, value) from None
            raise ValueError(_named(leaf, error)) from None  # the parser's own words
    return validate_value(leaf, value)


def check_config(config: Any) -> None:
    """Validate every setting of ``config`` by its annotation and metadata (type, choices,
    check, parser), then call each dataclass's own ``check(self)`` (cross-field rules), inner
    configs first. Raises ValueError naming the option: "--hidden must be a positive int (at
    most 2**63 - 1), got 0". The caller wraps it in ``rnnkit.errors.usage_errors()`` where the
    values came from the command line (exit 2).
    """
    by_path = {leaf.path: leaf for leaf in _all_leaves(type(config))}
    _check_tree(config, type(config), (), by_path)


def _check_tree(config: Any, cls: type, prefix: tuple[str, ...],
                by_path: Mapping[tuple[str, ...], Leaf]) -> None:
    if not isinstance(config, cls):
        raise ValueError(f"{'.'.join(prefix)} must be a {cls.__name__}, got {config!r}")
    for field, kind in _children(cls):
        value = getattr(config, field.name)
        path = (*prefix, field.name)
        if _is_dataclass_type(kind):
            _check_tree(value, kind, path, by_path)
        else:
            validate_value(by_path[path], value)
    if callable(getattr(config, "check", None)):
        config.check()


# --- dictionaries, files and TOML ------------------------------------------------------------

def _section(path: tuple[str, ...]) -> str:
    return f"in [{'.'.join(path)}]" if path else "at the top level"


def config_from_dict(config_type: type, data: Mapping[str, Any], source: str = "config",
                     defaults: Any = None) -> Any:
    """Nested mappings (a config file's, or a checkpoint's ``asdict(config)``) -> a
    ``config_type`` instance; what ``data`` leaves out comes from ``defaults`` (an instance),
    else from the dataclass defaults. Every value is validated (`check_config`) and the
    instance's ``check()`` rules run.

    Raises ValueError starting with ``source`` ("config file 'run.toml'") for an unknown key
    (naming the section and the accepted keys), a missing required one, or a bad value.
    """
    config, _ = _build_config(config_type, data, source, defaults, {})
    _checked(config, source)
    return config


def _checked(config: Any, source: str) -> None:
    try:
        check_config(config)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _build_config(config_type: type, data: Mapping[str, Any], source: str, defaults: Any,
                  overrides: Mapping[tuple[str, ...], Any],
                  exclude: frozenset[str] = frozenset()) -> tuple[Any, set[str]]:
    by_path = {leaf.path: leaf for leaf in _all_leaves(config_type)}
    excluded = {leaf.path for leaf in by_path.values()} - {
        leaf.path for leaf in leaves(config_type, exclude)} if exclude else set()
    if defaults is not None and not isinstance(defaults, config_type):
        raise TypeError(f"defaults must be a {config_type.__name__} instance, got {defaults!r}")
    given: set[str] = set()
    config = _build(config_type, data, copy.deepcopy(defaults), source, (), by_path, overrides,
                    given, excluded)
    return config, given


def _build(cls: type, data: Any, defaults: Any, source: str, prefix: tuple[str, ...],
           by_path: Mapping[tuple[str, ...], Leaf], overrides: Mapping[tuple[str, ...], Any],
           given: set[str], excluded: set[tuple[str, ...]]) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: [{'.'.join(prefix)}] must be a table of keys, got "
                         f"{_shown(data)}")
    children = _children(cls)
    accepted = [field.name for field, _ in children if (*prefix, field.name) not in excluded]
    for key in data:
        if key not in accepted:
            raise ValueError(f"{source}: unknown key {key!r} {_section(prefix)}; accepted: "
                             f"{', '.join(accepted)}")
    values: dict[str, Any] = {}
    for field, kind in children:
        path = (*prefix, field.name)
        inner_defaults = getattr(defaults, field.name) if defaults is not None else None
        if _is_dataclass_type(kind):
            if inner_defaults is None:  # the field's own default tree (an app's default_loop())
                inner_defaults = _own_default(field)
            values[field.name] = _build(kind, data.get(field.name, {}), inner_defaults, source,
                                        path, by_path, overrides, given, excluded)
            continue
        leaf = by_path[path]
        if field.name in data:
            try:
                values[field.name] = _value_from_file(leaf, data[field.name])
            except ValueError as error:
                raise ValueError(f"{source}: key {field.name!r} {_section(prefix)}: {error}"
                                 ) from None
            given.add(leaf.dotted)
        if path in overrides:
            values[field.name] = overrides[path]
            given.add(leaf.dotted)
        if field.name in values:
            continue
        if defaults is not None:
            values[field.name] = inner_defaults
        elif field.default is not dataclasses.MISSING:
            values[field.name] = copy.deepcopy(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
        else:
            how = f"give {leaf.label} or " if leaf.option else ""
            raise ValueError(f"{source}: {leaf.dotted} has no default: {how}set key "
                             f"{field.name!r} {_section(prefix)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:  # the dataclass's own __post_init__ refused
        raise ValueError(f"{source}: {error}") from None


def _own_default(field: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its factory), else None."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else copy.deepcopy(field.default)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``, with PyYAML) file -> nested dicts.

    Raises ValueError naming the file (and the line, for a syntax error).
    """
    path = Path(path)
    source = f"config file {str(path)!r}"
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"{source}: unknown format {suffix or '(no suffix)'}; accepted: "
                         f"{', '.join(CONFIG_SUFFIXES)}")
    yaml = _import_yaml(source) if suffix != ".toml" else None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{source} does not exist") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{source} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise ValueError(f"{source} cannot be read: {error.strerror or error}") from None
    if yaml is None:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:  # its message ends "(at line L, column C)"
            raise ValueError(f"{source} is not valid TOML: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{source} is not valid YAML{where}: {problem}") from None
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a mapping of keys at the top level, got "
                         f"{type(data).__name__}")
    return data


def _import_yaml(source: str):
    try:
        import yaml
    except ModuleNotFoundError:
        raise ValueError(f"{source}: reading YAML needs PyYAML: pip install \"rnnkit[yaml]\" "
                         "(or use a .toml file)") from None
    return yaml


def _toml_string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
               "\r": "\\r"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # control characters TOML refuses raw
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(name: str) -> str:
    bare = name and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    return name if bare else _toml_string(name)


def _toml_value(value: Any) -> str:
    if value is None:
        return _toml_string(NONE_WORD)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # always with '.' or 'e': read back as a float
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def config_to_toml(config: Any, exclude: frozenset[str] | set[str] = frozenset()) -> str:
    """``config`` as a TOML document: settings as keys (each with its help as a comment),
    nested configs as tables (``[model.recurrent]``), None as the string "none".
    `config_from_dict` of its `tomllib` parse gives ``config`` back. Settings in ``exclude``
    (dotted paths) are left out, as `add_config_arguments` leaves them out.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {config!r}")
    by_path = {leaf.path: leaf for leaf in leaves(type(config), exclude)}
    lines: list[str] = []
    _write_table(config, (), by_path, lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_table(config: Any, prefix: tuple[str, ...], by_path: Mapping[tuple[str, ...], Leaf],
                 lines: list[str]) -> None:
    if prefix:
        lines += ["", "[" + ".".join(_toml_key(name) for name in prefix) + "]"]
    tables = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        path = (*prefix, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            tables.append((value, path))  # a nested config: its table follows these keys
            continue
        if path not in by_path:  # excluded
            continue
        line = f"{_toml_key(field.name)} = {_toml_value(value)}"
        comment = by_path[path].comment
        lines.append(f"{line}  # {comment}" if comment else line)
    for value, path in tables:
        _write_table(value, path, by_path, lines)


# --- the command line ------------------------------------------------------------------------

def _default_config(config_type: type, defaults: Any) -> Any:
    if defaults is not None:
        if not isinstance(defaults, config_type):
            raise TypeError(f"defaults must be a {config_type.__name__} instance, got "
                            f"{defaults!r}")
        return defaults
    try:
        return config_type()
    except TypeError:  # required fields: each leaf falls back on its own default, if any
        return None


def _field_default(leaf: Leaf, config: Any, config_type: type) -> Any:
    if config is not None:
        return leaf.read(config)
    # A required field above: walk the field defaults down to the leaf's table.
    cls, node = config_type, None
    for name in leaf.path[:-1]:
        field = next(f for f, _ in _children(cls) if f.name == name)
        node = getattr(node, name) if node is not None else _own_default(field)
        cls = dict((f.name, k) for f, k in _children(cls))[name]
    if node is not None:
        return getattr(node, leaf.path[-1])
    if leaf.field.default is not dataclasses.MISSING:
        return leaf.field.default
    if leaf.field.default_factory is not dataclasses.MISSING:
        return leaf.field.default_factory()
    return UNSET


def _help(leaf: Leaf, default: Any) -> str:
    if default is UNSET:
        said = "no default: required"
    elif leaf.base is bool:
        said = f"default: {leaf.option if default else '--no-' + leaf.option[2:]}"
    elif default == "" or default == []:
        said = "default: ''"  # what gives it on the command line: --name ''

    else:
        said = f"default: {format_value(leaf, default)}"
    text = f"{leaf.comment} ({said})" if leaf.comment else f"({said})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_config_arguments(parser: argparse.ArgumentParser | Any, config_type: type,
                         defaults: Any = None,
                         exclude: frozenset[str] | set[str] = frozenset()) -> None:
    """Add one option per leaf setting of ``config_type`` to ``parser`` (nested configs as
    argument groups), plus ``--config FILE`` and ``--print-config``.

    ``defaults`` (a ``config_type`` instance) gives this command's own defaults, shown in the
    help; pass the same one to `config_from_arguments`. Every option's argparse default is
    `UNSET`, so `config_from_arguments` knows what the command line gave. ``--print-config``
    only sets ``args.print_config``: the caller prints ``config_to_toml(config)`` and exits 0.
    ``exclude`` (dotted paths, e.g. ``{"recurrent.cell"}``) are settings the command fixes
    itself: no option, refused in its files; pass the same to `config_from_arguments`.
    """
    default_config = _default_config(config_type, defaults)
    groups: dict[tuple[str, ...], Any] = {(): parser}
    for leaf in leaves(config_type, exclude):
        if leaf.option is None:
            continue
        section = leaf.path[:-1]
        if section not in groups:
            groups[section] = parser.add_argument_group(
                f"{'.'.join(section)} settings ([{'.'.join(section)}] in a config file)")
        target = groups[section]
        text = _help(leaf, _field_default(leaf, default_config, config_type))
        if leaf.base is bool:
            action = target.add_argument(leaf.option, dest=leaf.dotted, default=None, help=text,
                                         action=argparse.BooleanOptionalAction)
            # Set after construction: given at once, Python < 3.13 would add its own
            # "(default: <not given>)" to the help.
            action.default = UNSET
        elif leaf.positional:
            target.add_argument(leaf.dotted, nargs="?", metavar=leaf.metavar, default=UNSET,
                                type=_parser_of(leaf), help=text)
        else:
            target.add_argument(leaf.option, dest=leaf.dotted, metavar=leaf.metavar,
                                default=UNSET, type=_parser_of(leaf), help=text,
                                nargs=leaf.field.metadata.get("nargs"))
    parser.add_argument("--config", dest=CONFIG_FILE_DEST, metavar="FILE", default=None,
                        help="read settings from this TOML file (or YAML: .yaml/.yml); options "
                        "given here override it")
    parser.add_argument("--print-config", dest=PRINT_CONFIG_DEST, action="store_true",
                        help="print the resolved settings as TOML (a --config FILE) and exit")


def _parser_of(leaf: Leaf) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return parse_text(leaf, text)
    parse.__name__ = leaf.field.name  # argparse names the type in some messages
    return parse


def config_from_arguments(args: argparse.Namespace, config_type: type, defaults: Any = None,
                          *, check: bool = True, exclude: frozenset[str] | set[str] = frozenset()
                          ) -> tuple[Any, set[str]]:
    """The config that parsed ``args`` describe, and the dotted paths of the settings given
    explicitly (in ``--config FILE`` or on the command line), e.g. {"model.hidden_size"}.

    Order: ``defaults`` (or the dataclass defaults) < the file < the command line. With
    ``check``, `check_config` runs on the result (ValueError; wrap it in
    ``rnnkit.errors.usage_errors()`` for exit 2). A bad file raises ValueError naming it.
    """
    overrides = {}
    for leaf in leaves(config_type, exclude):
        value = getattr(args, leaf.dotted, UNSET) if leaf.option is not None else UNSET
        if value is not UNSET:
            overrides[leaf.path] = value
    config_file = getattr(args, CONFIG_FILE_DEST, None)
    data = read_config_file(config_file) if config_file is not None else {}
    source = f"config file {str(config_file)!r}" if config_file is not None else "command line"
    config, given = _build_config(config_type, data, source, defaults, overrides,
                                  frozenset(exclude))
    if check:
        check_config(config)
    return config, given


def version_string() -> str:
    """"rnnkit <version>", for ``rnnkit --version``: the installed distribution's version, else
    the package's ``__version__`` (a source checkout on PYTHONPATH)."""
    try:
        version = importlib.metadata.version("rnnkit")
    except importlib.metadata.PackageNotFoundError:
        import rnnkit

        version = getattr(rnnkit, "__version__", "unknown")
    return f"rnnkit {version}"
