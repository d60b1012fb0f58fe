"""Typed settings from flags and environment variables, declared once as a dataclass.

Each field of a settings dataclass becomes a flag (``--max-batch``) and an
environment variable (``VPM_ENCODER_MAX_BATCH``); a flag wins over the
environment, the environment over the default. Every error names the key it
is about, so a bad deployment fails at start with one clear line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the flag and variable."""


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    env: str | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """Declare a settings field: its default, help text, and optionally its env name and choices."""
    metadata = {"help": help, "env": env, "choices": tuple(choices) if choices else None}
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple for sequence defaults")
    return dataclasses.field(default=default, metadata=metadata)


def ordered_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a settings class declares itself, then those it inherits (shared guards):
    dataclasses put inherited fields first, which would lead --help with the least asked."""
    own = set(cls.__dict__.get("__annotations__", {}))
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def flag_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def env_name(field: dataclasses.Field, prefix: str) -> str:
    return field.metadata.get("env") or prefix + field.name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parser_for(annotation: Any) -> tuple[Callable[[str], Any], str]:
    """The text parser for a field's type, and how to describe what it expects."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        parse, what = _parser_for(inner[0])

        def optional(text: str) -> Any:
            return None if text.strip() == "" else parse(text)

        return optional, what
    if origin is tuple:
        return _parse_list, "a comma-separated list"
    if annotation is bool:
        return _parse_bool, "true or false"
    if annotation is int:
        return int, "an integer"
    if annotation is float:
        return float, "a number"
    if annotation is Path:
        return Path, "a path"
    return str, "a string"


def load_settings(
    cls: type[T],
    prefix: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    description: str = "",
    prog: str | None = None,
) -> T:
    """Build ``cls`` from flags (argv) over environment variables over defaults.

    Flag errors exit through argparse (status 2, usage line); environment
    errors and validation errors raised by ``cls.__post_init__`` come out as
    SettingsError naming the flag and the variable.
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    values: dict[str, Any] = {}
    bad_environment: dict[str, str] = {}  # raised only where no flag overrides the variable
    for field in ordered_fields(cls):
        parse, what = _parser_for(hints[field.name])
        env = env_name(field, prefix)
        if env in environ:
            try:
                values[field.name] = parse(environ[env])
            except ValueError:
                bad_environment[field.name] = f"{env}={environ[env]!r}: expected {what}"
        choices = field.metadata.get("choices")
        default = field.default if field.default is not dataclasses.MISSING else None
        if typing.get_origin(hints[field.name]) is tuple and default is not None:
            default = ",".join(default)
        # A bare boolean flag (--prune) means true; --prune false also works.
        switch = {"nargs": "?", "const": True} if hints[field.name] is bool else {}
        parser.add_argument(
            flag_name(field),
            dest=field.name,
            type=_argparse_type(parse, what),
            choices=choices,
            default=argparse.SUPPRESS,
            help=f"{field.metadata.get('help', '')} [env {env}; default: {default}]",
            **switch,
        )
    flags = vars(parser.parse_args(argv))
    for name, message in bad_environment.items():
        if name not in flags:
            raise SettingsError(message)
    values.update(flags)
    for field in dataclasses.fields(cls):
        choices = field.metadata.get("choices")
        if field.name in values and choices and values[field.name] not in choices:
            raise SettingsError(
                f"{describe(cls, field.name, prefix)}: expected one of {', '.join(choices)}, "
                f"got {values[field.name]!r}"
            )
        if field.name not in values and field.default is dataclasses.MISSING:
            raise SettingsError(f"{describe(cls, field.name, prefix)} is required")
    try:
        return cls(**values)
    except SettingsError as err:
        raise SettingsError(_with_keys(cls, prefix, str(err))) from None


def _argparse_type(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return convert


def describe(cls: type, name: str, prefix: str) -> str:
    """'--max-batch / VPM_ENCODER_MAX_BATCH' for a field name."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f"{flag_name(field)} / {env_name(field, prefix)}"


def _with_keys(cls: type, prefix: str, message: str) -> str:
    """Rewrite a validation message 'field_name: ...' to name the flag and the variable."""
    name, sep, rest = message.partition(":")
    names = {f.name for f in dataclasses.fields(cls)}
    if sep and name in names:
        return f"{describe(cls, name, prefix)}:{rest}"
    return message


def check(condition: bool, field_name: str, message: str) -> None:
    """Validation helper for __post_init__: raise SettingsError('field_name: message')."""
    if not condition:
        raise SettingsError(f"{field_name}: {message}")


def markdown_table(cls: type, prefix: str) -> str:
    """The settings of `cls` as a Markdown table (flag, environment variable, default, meaning)."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for field in ordered_fields(cls):
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(default)
        if isinstance(default, Path) and default.is_relative_to(Path.home()):
            default = "~/" + default.relative_to(Path.home()).as_posix()
        shown = "" if default is None else "(empty)" if default == "" else f"`{default}`"
        meaning = field.metadata.get("help", "").replace("|", "\\|")
        if field.metadata.get("choices"):
            meaning += f" ({' / '.join(field.metadata['choices'])})"
        keys = f"`{flag_name(field)}` | `{env_name(field, prefix)}`"
        lines.append(f"| {keys} | {shown} | {meaning} |")
    return "\n".join(lines)
