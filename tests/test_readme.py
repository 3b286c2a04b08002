"""The README stays true: its Python snippets run, in order and in one namespace, in a fresh folder; every `vitzoo`
command line in its shell snippets names a command that exists with options it knows, typed right (composed as the
CLI composes them, without running)."""

import os
import re
import shlex

import pytest
from conftest import REPO

from vitzoo.cli import COMMANDS, PLAIN_COMMANDS, main, validate_overrides
from vitzoo.options import parse
from vitzoo.zoo_builder.config import register_schemas

README = (REPO / "README.md").read_text()
PLACEHOLDER = re.compile(r"<[^>]*>|\||\.\.\.|…")  # <zoo>, alternatives a|b, "..."


def snippets(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def command_lines() -> list[list[str]]:
    """The arguments after `vitzoo` (or `-m vitzoo.cli`) of every concrete command line of the shell snippets."""
    found = []
    for block in snippets("bash"):
        for line in block.replace("\\\n", " ").splitlines():  # continuation lines joined
            segments = [[]]  # the commands of one line: split at &&, & and ;
            for word in shlex.split(line, comments=True) if "vitzoo" in line else []:
                segments.append([]) if word in ("&&", "&", ";") else segments[-1].append(word)
            for words in segments:
                starts = [i for i, word in enumerate(words) if word in ("vitzoo", "vitzoo.cli")]
                if not starts or PLACEHOLDER.search(" ".join(words)) or any(w.startswith("[") for w in words):
                    continue  # set-up commands, and lines with placeholders or optional parts
                found.append(words[starts[0] + 1 :])
    return found


def test_every_concrete_command_line_composes():
    register_schemas()
    lines = command_lines()
    assert len(lines) >= 40
    for args in lines:
        command, rest = args[0], args[1:]
        if command in PLAIN_COMMANDS:
            parse(command, rest, *PLAIN_COMMANDS[command])
            continue
        if "--help" in rest:
            assert command in COMMANDS, command
            continue
        rest = [word for word in rest if word not in ("--multirun", "-m")]
        if rest and "=" not in rest[0] and not rest[0].startswith("-"):
            rest = [f"path={rest[0]}", *rest[1:]]
        validate_overrides(command, rest)  # raises on an unknown command, key, preset or a mistyped value


def test_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    export = next(args for args in command_lines() if args[0] == "export")  # the snippet that loads an export
    main(export)
    namespace: dict = {}
    for i, code in enumerate(snippets("python")):
        try:
            exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"README python snippet {i + 1} failed: {type(error).__name__}: {error}\n{code}")
    assert os.path.exists("spec.json")  # the tokenizer snippet saved its spec here, not in the repository
