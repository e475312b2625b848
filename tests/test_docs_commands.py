"""Every command the docs show works as written, checked cheaply (no process launched per command).

From the ```bash (also sh/shell/console and unlabelled) blocks of README.md and docs/*.md, every
command that invokes the project: `minillama ...`, `python -m minillama.cli ...`, `torchrun ... -m
minillama.cli ...`, `accelerate launch ...`, `python tools/X.py ...`, `bash tools/X.sh`, `make T`,
`pip install 'minillama[extra]'`. Each is parsed by the real parser (the CLI's, torchrun's,
accelerate's, each tool's own argparse), run through the checks the CLI makes before loading a
model (sampling, stop strings, quantization mode, norm, serving settings, the fine-tuning recipe
with its overrides), and checked for the repository files it names and for tensor parallelism
that fits: --tp N equal to the number of processes launched, and N dividing the heads and MLP
width of the model the command uses (the embedded SmolLM2-135M-Instruct unless --model names
an existing directory). Placeholders (DIR, OUT, FILE.gguf) only have to parse.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = ("bash", "sh", "shell", "console", "")
REPO_DIRS = ("configs/", "tools/", "docs/", "tests/", "kernels/", "minillama/")
SEPARATORS = {"|", "||", "&&", ";", "&"}
EMBEDDED = {None, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class Command:
    doc: str
    line: int
    text: str  # as written (continuations joined)
    argv: list[str] | None  # None: the line does not split into shell words

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _lines(block: str, first: int):
    """(line number, logical line) with backslash continuations joined."""
    pending, start = "", first
    for i, raw in enumerate(block.splitlines(), first):
        if not pending:
            start = i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield start, pending + raw
        pending = ""
    if pending:
        yield start, pending


def _split(line: str) -> list[list[str]]:
    """Shell words of one line in pipeline/list segments; comments dropped, `[--opt VALUE]` unbracketed."""
    line = re.sub(r"\[(-[^\[\]]*)\]", r"\1", line)  # usage-style optional flags: [--model DIR]
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    segments: list[list[str]] = [[]]
    for token in lex:
        if token in SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def _invokes_project(argv: list[str]) -> bool:
    words = [w for w in argv if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)] or [""]
    return words[0] in ("minillama", "torchrun", "accelerate", "make") or any(
        "minillama" in w or w.startswith(REPO_DIRS) for w in words)


def shell_blocks(text: str):
    """(first line number, text) of every fenced block in a shell language (or none)."""
    fence, lang, start, body = None, "", 0, []
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence is None and m:
            fence, lang, start, body = m.group(1), m.group(2).lower(), number + 1, []
        elif fence is not None and line.strip() == fence:
            if lang in SHELL_LANGS:
                yield start, "\n".join(body)
            fence = None
        elif fence is not None:
            body.append(line)


def doc_commands() -> list[Command]:
    found = []
    for doc in DOCS:
        for first, block in shell_blocks(doc.read_text()):
            for number, line in _lines(block, first):
                where = doc.relative_to(ROOT).as_posix(), number, line.strip()
                try:
                    segments = _split(line)
                except ValueError:  # e.g. a quote closed on a later line (curl -d '{...}')
                    if re.search(r"minillama|tools/|torchrun|accelerate|^\s*make\b", line):
                        found.append(Command(*where, None))
                    continue
                found.extend(Command(*where, argv) for argv in segments if _invokes_project(argv))
    return found


COMMANDS = doc_commands()


# ---- checkers ---------------------------------------------------------------------------------

class _Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args once a tool's arguments parsed: stops the tool."""


class Checker:
    def __init__(self, embedded_config: Any, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture) -> None:
        self.embedded_config = embedded_config
        self.monkeypatch, self.capsys = monkeypatch, capsys
        self.problems: list[str] = []

    def fail(self, message: str) -> None:
        self.problems.append(message)

    # -- the pieces of a command
    def check(self, argv: list[str]) -> None:
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):  # PYTHONPATH=. python ...
            argv = argv[1:]
        self.check_paths(argv)
        prog, rest = argv[0], argv[1:]
        if prog == "minillama":
            self.minillama(rest, processes=1)
        elif prog in ("python", "python3"):
            self.python(rest, processes=1)
        elif prog == "torchrun":
            self.torchrun(rest)
        elif prog == "accelerate":
            self.accelerate(rest)
        elif prog == "make":
            self.make(rest)
        elif prog in ("bash", "sh"):
            self.shell_script(rest)
        elif prog == "pip":
            self.pip(rest)
        elif prog == "echo":
            pass
        else:
            self.fail(f"no check for {prog!r} commands: extend tests/test_docs_commands.py")

    def check_paths(self, argv: list[str]) -> None:
        for word in argv:
            for value in (word, word.partition("=")[2]):
                if value.startswith(REPO_DIRS) and not (ROOT / value).exists():
                    self.fail(f"{value}: no such file in the repository")

    def python(self, rest: list[str], processes: int) -> None:
        if rest[:2] == ["-m", "pip"]:
            return self.pip(rest[2:])
        if rest[:2] == ["-m", "minillama.cli"] or rest[:2] == ["-m", "minillama"]:
            return self.minillama(rest[2:], processes)
        if rest and rest[0].endswith(".py"):
            return self.script(rest[0], rest[1:], processes)
        self.fail(f"python {' '.join(rest[:2])}: no check for this form")

    def pip(self, rest: list[str]) -> None:
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for word in rest:
            m = re.fullmatch(r"minillama\[(.+)\]", word)
            for extra in (m.group(1).split(",") if m else []):
                if extra.strip() not in extras:
                    self.fail(f"pip: minillama has no extra {extra!r} (pyproject.toml: {', '.join(extras)})")

    def torchrun(self, rest: list[str]) -> None:
        from torch.distributed.run import get_args_parser

        args = self.parse(get_args_parser(), rest, "torchrun")
        if args is None:
            return
        try:
            nodes = int(str(args.nnodes).split(":")[-1])
            processes = int(args.nproc_per_node) * nodes
        except ValueError:
            processes = None  # "gpu", "auto", ...: decided on the machine
        self.launched(args.module, args.training_script, args.training_script_args, processes)

    def accelerate(self, rest: list[str]) -> None:
        if not rest or rest[0] != "launch":
            return self.fail(f"accelerate {' '.join(rest[:1])}: no check for this form")
        from accelerate.commands.launch import launch_command_parser

        args = self.parse(launch_command_parser(), rest[1:], "accelerate launch")
        if args is None:
            return
        processes = args.num_processes
        if processes is None and args.config_file:
            import yaml

            config = ROOT / args.config_file
            if not config.is_file():
                return self.fail(f"accelerate launch: --config_file {args.config_file} does not exist")
            processes = (yaml.safe_load(config.read_text()) or {}).get("num_processes", 1)
        self.launched(args.module, args.training_script, args.training_script_args, processes or 1)

    def launched(self, module: bool, target: str, argv: list[str], processes: int | None) -> None:
        if module:
            if target in ("minillama.cli", "minillama"):
                return self.minillama(argv, processes)
            return self.fail(f"-m {target}: no check for this module")
        self.script(target, argv, processes)

    def make(self, rest: list[str]) -> None:
        makefile = (ROOT / "Makefile").read_text()
        targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", makefile, re.M))
        for word in rest:
            if not word.startswith("-") and "=" not in word and word not in targets:
                self.fail(f"make {word}: no such target in the Makefile ({', '.join(sorted(targets))})")

    def shell_script(self, rest: list[str]) -> None:
        script = ROOT / rest[0]
        if not script.is_file():
            return  # check_paths said so
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        if done.returncode:
            self.fail(f"bash -n {rest[0]}: {done.stderr.strip()}")

    def parse(self, parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace | None:
        try:
            return parser.parse_args(argv)
        except SystemExit as e:
            if e.code:
                err = self.capsys.readouterr().err.strip().splitlines()
                self.fail(f"{what} rejects {shlex.join(argv)}: {err[-1] if err else f'exit {e.code}'}")
            return None

    def script(self, path: str, argv: list[str], processes: int | None) -> None:
        """Run the tool as `python path argv...` would, up to its parse_args (the real parser and its
        values), then check the parsed options like the CLI's (tools/finetune.py is the CLI)."""
        script = ROOT / path
        if not script.is_file():
            if not path.startswith(REPO_DIRS):  # (check_paths reported those)
                self.fail(f"{path}: no such file in the repository")
            return None
        if script.suffix != ".py":
            return self.fail(f"{path}: not a Python script")
        parsed: dict[str, argparse.Namespace] = {}
        real = argparse.ArgumentParser.parse_args

        def parse_args(parser: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
            parsed["args"] = real(parser, args, namespace)
            raise _Parsed

        with self.monkeypatch.context() as mp:
            mp.setattr(argparse.ArgumentParser, "parse_args", parse_args)
            mp.setattr(sys, "argv", [str(script), *argv])
            mp.syspath_prepend(str(script.parent))
            try:
                runpy.run_path(str(script), run_name="__main__")
            except _Parsed:
                pass
            except SystemExit as e:
                err = self.capsys.readouterr().err.strip().splitlines()
                return self.fail(f"{path} rejects {shlex.join(argv)}: {err[-1] if err else f'exit {e.code}'}")
        if "args" not in parsed:
            return self.fail(f"{path}: ended without parsing its arguments")
        if getattr(parsed["args"], "func", None) is not None:  # the CLI: finetune.py, generate_batch.py
            self.cli_options(parsed["args"], processes)

    def minillama(self, argv: list[str], processes: int | None) -> None:
        from minillama.cli import build_parser

        args = self.parse(build_parser(), argv, "minillama")
        if args is not None:
            self.cli_options(args, processes)

    def cli_options(self, args: argparse.Namespace, processes: int | None) -> None:
        """What the CLI checks before it loads a model, and tensor parallelism against the model."""
        from minillama import cli
        from minillama.errors import MinillamaError

        command = args.func.__name__
        try:
            if command in ("cmd_generate", "cmd_chat", "cmd_generate_batch"):
                cli._sampling(args)
            if getattr(args, "quantize", None) is not None or command == "cmd_quantize":
                from minillama.quant import as_quant_config

                as_quant_config(args.quantize if command != "cmd_quantize" else args.mode)
            if getattr(args, "norm", None) is not None:
                from minillama.norms import parse_norm

                parse_norm(args.norm)
            if command == "cmd_serve":
                from minillama.engine import check_settings

                check_settings(args.max_batch, args.max_queue, args.max_seq_len, args.prefill_chunk)
            if command == "cmd_finetune":
                self.recipe(args)
        except MinillamaError as e:
            self.fail(f"minillama: error: {e}")
        tp = getattr(args, "tp", None)
        if tp is not None and tp != processes and processes is not None:
            self.fail(f"--tp {tp} needs {tp} processes; the command launches {processes}")
        if tp is not None and tp > 1:
            config = self.model_config(args.model)
            if config is not None:
                from minillama.errors import ConfigError
                from minillama.parallel import shard_config

                try:
                    shard_config(config, tp)
                except ConfigError as e:
                    self.fail(f"minillama: error: {e}")

    def recipe(self, args: argparse.Namespace) -> None:
        """cmd_finetune itself up to the training: the recipe loaded with the command's overrides."""
        import minillama.train
        from minillama import cli

        loaded = []
        with self.monkeypatch.context() as mp:
            mp.setattr(minillama.train, "finetune", lambda cfg, **_: loaded.append(cfg))
            cli.cmd_finetune(args)
        assert loaded

    def model_config(self, model: str | None) -> Any:
        if model in EMBEDDED:
            return self.embedded_config
        if model is not None and (ROOT / model / "config.json").is_file():
            from minillama.config import load_config

            return load_config(ROOT / model)
        return None  # a placeholder (DIR) or a model made by an earlier command: any count may fit


@pytest.fixture(scope="module")
def embedded_config(smollm2_dir: Path) -> Any:
    from minillama.config import load_config

    return load_config(smollm2_dir)


def test_the_docs_show_commands() -> None:
    """The extraction finds the commands (a broken regex must not pass the check vacuously)."""
    texts = [c.text for c in COMMANDS]
    assert len(COMMANDS) > 30
    assert any(t.startswith("torchrun") and "--tp" in t for t in texts)
    assert any(t.startswith("accelerate launch") for t in texts)
    assert any(t.startswith("make ") for t in texts)
    assert any("tools/bench_kernels.py" in t for t in texts)  # unlabelled blocks too


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.doc}:{c.line}" for c in COMMANDS])
def test_doc_command_works_as_written(command: Command, embedded_config: Any, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    assert command.argv is not None, f"{command}\n  does not split into shell words (unbalanced quotes?)"
    checker = Checker(embedded_config, monkeypatch, capsys)
    checker.check(command.argv)
    assert not checker.problems, f"{command}\n  " + "\n  ".join(checker.problems)


def test_checker_catches_what_it_should(embedded_config: Any, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    """Each kind of breakage is reported (the checks are not vacuous)."""
    bad = {
        "torchrun --nproc_per_node 2 -m minillama.cli generate --tp 2 -p Hello":
            "process counts that work for this model: 1, 3",
        "torchrun --nproc_per_node 3 -m minillama.cli generate --tp 2 -p Hello": "launches 3",
        "minillama generate --tp 3 -p Hello": "launches 1",
        "minillama generate --frobnicate": "unrecognized arguments: --frobnicate",
        "minillama generate -p x --top-p 2": "top_p",
        "minillama generate -p x --quantize int5": "int5",
        "python tools/bench_norm.py --no-such-flag": "unrecognized arguments: --no-such-flag",
        "python tools/finetune.py --config configs/finetune/tiny.yaml --set optim.nope=1": "optim.nope",
        "python tools/nope.py": "tools/nope.py: no such file",
        "accelerate launch --config_file configs/accelerate/none.yaml tools/finetune.py": "none.yaml",
        "make nope": "make nope: no such target",
        "pip install 'minillama[nope]'": "no extra 'nope'",
    }
    for line, expected in bad.items():
        checker = Checker(embedded_config, monkeypatch, capsys)
        for argv in _split(line):
            checker.check(argv)
        assert any(expected in p for p in checker.problems), (line, checker.problems)
    good = Checker(embedded_config, monkeypatch, capsys)
    good.check(_split("torchrun --nproc_per_node 3 -m minillama.cli generate --tp 3 -p Hello")[0])
    assert not good.problems
