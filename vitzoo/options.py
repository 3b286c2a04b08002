"""One way to pass options to every `vitzoo` command: `key=value`, and `vitzoo <command> --help` listing each option
with its default and a one-line description.

Hydra commands read their options from `configs/<command>.yaml`; their help is that file's keys, values and
comments (and the config groups it composes, with the presets each offers). The commands that need no Hydra
(verify, probe, import, export, conditioning, summary) declare their options as `Option`s and parse them with
`parse`, which accepts the same `key=value` syntax (`true`/`false`, numbers, `null`, lists as `[a,b]`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vitzoo.errors import ConfigError

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(#\s?(?P<comment>.*))?$")
HIDDEN_BLOCKS = ("defaults", "hydra")


@dataclass(frozen=True)
class Option:
    default: object
    help: str
    kind: type = str  # str | int | float | bool | list (of floats)


@dataclass(frozen=True)
class Positional:
    name: str
    help: str
    count: str = "1"  # "1" | "?" (optional) | "*" (any number)


def hydra_help(command: str, description: str, config_dir: Path) -> str:
    """The help of a Hydra command from configs/<command>.yaml (see module docstring)."""
    lines = (config_dir / f"{command}.yaml").read_text().splitlines()
    examples = [line[1:].rstrip() for line in lines if line.startswith("#   ")]
    out = [f"usage: vitzoo {command} [key=value ...]", "", description]
    if examples:
        out += ["", "examples:", *examples]
    groups = _groups(lines, config_dir)
    if groups:
        out += ["", "config groups (configs/<group>/<preset>.yaml):"]
        out += [f"  {group + '=' + default:<28} presets: {', '.join(presets)}" for group, default, presets in groups]
    out += ["", "options (key=default, then what it does):"]
    out += [_row(key, value, text) for key, value, text in _options(lines)]
    out += ["", "Hydra flags work too: --cfg job prints the composed config, --multirun sweeps a=1,2."]
    return "\n".join(out)


def _groups(lines: list[str], config_dir: Path) -> list[tuple[str, str, list[str]]]:
    groups = []
    for line in lines:
        match = re.match(r"^\s+- (?P<group>\w+): (?P<default>[\w.]+)", line)
        if match and (config_dir / match["group"]).is_dir():
            presets = sorted(p.stem for p in (config_dir / match["group"]).glob("*.yaml"))
            groups.append((match["group"], match["default"], presets))
    return groups


def _options(lines: list[str]) -> list[tuple[str, str, str]]:
    """(dotted key, value, description) of every option line; a comment-only line below one continues it."""
    options: list[list[str]] = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing blocks
    hidden = False
    for line in lines:
        if not line.strip() or line.lstrip().startswith("- "):
            continue
        if line.lstrip().startswith("#"):
            if options and line.startswith(" ") and not hidden:
                options[-1][2] = f"{options[-1][2]} {line.strip()[1:].strip()}".strip()
            continue
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent, key, value = len(match["indent"]), match["key"], match["value"].strip()
        parents = [(i, k) for i, k in parents if i < indent]
        if indent == 0:
            hidden = key in HIDDEN_BLOCKS
        if hidden:
            continue
        if not value:  # a block: its keys follow, indented
            parents.append((indent, key))
            continue
        dotted = ".".join([k for _, k in parents] + [key])
        options.append([dotted, value, match["comment"] or ""])
    return [tuple(option) for option in options]


def _row(key: str, value: str, text: str) -> str:
    setting = f"{key}={value}"
    return f"  {setting:<28} {text}".rstrip() if len(setting) <= 28 else f"  {setting}\n  {'':<28} {text}".rstrip()


def plain_help(command: str, description: str, positionals: list[Positional], options: dict[str, Option]) -> str:
    names = " ".join({"1": f"<{p.name}>", "?": f"[<{p.name}>]", "*": f"[<{p.name}> ...]"}[p.count] for p in positionals)
    out = [f"usage: vitzoo {command} {names}{' [key=value ...]' if options else ''}", "", description, ""]
    out += ["arguments:", *[f"  {p.name:<28} {p.help}" for p in positionals]]
    if options:
        out += ["", "options (key=default, then what it does):"]
        out += [_row(key, _text(option.default), option.help) for key, option in options.items()]
    return "\n".join(out)


def parse(
    command: str, args: list[str], positionals: list[Positional], options: dict[str, Option]
) -> tuple[dict[str, object], dict[str, object]]:
    """Positional arguments by name (a list for "*") and every option's value (its default unless given).
    ConfigError for an unknown option, a value of the wrong type or missing/extra arguments."""
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise ConfigError(f"unknown flag {flags[0]}: options are key=value ({', '.join(options) or 'none'}); "
                          f"vitzoo {command} --help lists them")  # fmt: skip
    given = [a for a in args if "=" not in a]
    values = {key: option.default for key, option in options.items()}
    for key, text in (a.split("=", 1) for a in args if "=" in a):
        if key not in options:
            raise ConfigError(f"unknown option {key}=; options: {', '.join(options) or 'none'}")
        values[key] = _convert(key, text, options[key].kind)
    named: dict[str, object] = {}
    for positional in positionals:
        if positional.count == "*":
            named[positional.name], given = given, []
        elif given:
            named[positional.name] = given.pop(0)
        elif positional.count == "1":
            raise ConfigError(f"missing <{positional.name}>: {positional.help}")
        else:
            named[positional.name] = None
    if given:
        raise ConfigError(f"unexpected argument {given[0]!r} (options are key=value)")
    return named, values


def _convert(key: str, text: str, kind: type):
    if text in ("null", "None", "~"):
        return None
    try:
        if kind is bool:
            if text not in ("true", "false"):
                raise ValueError
            return text == "true"
        if kind is list:
            return [float(v) for v in text.strip("[]").split(",") if v.strip()]
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}={text}: expected {'true or false' if kind is bool else kind.__name__}") from None


def _text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
