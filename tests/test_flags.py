"""One name, one spelling and one unit per concept across every command line: protein-performer's subcommands
(fit/validate/test included), protein-performer-prep and the benchmarks. Renamed flags stop with one line."""

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
from conftest import REPO, TINY

from protein_performer.cli import COMMANDS
from protein_performer.commands import RENAMED, build_parser, option_strings
from protein_performer.prep.__main__ import prep

# Spellings of one concept: at most one of each row may appear in all the command lines together.
SYNONYMS = [
    ("max_len", "max_length", "max_seq_len", "seq_len"),  # tokens per sequence, [BOS] included
    ("max_tokens", "tokens_per_batch", "batch_tokens"),  # padded tokens per batch
    ("input", "fasta", "in_file"),
    ("ckpt_path", "ckpt", "checkpoint_path"),
    ("num_sequences", "num", "proteins", "n_sequences"),
    ("nb_features", "features", "num_features"),  # random features m
    ("out", "output", "out_dir", "output_dir"),
]
BENCHMARKS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.stem != "results_io")


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def benchmark_parser(path: Path) -> argparse.ArgumentParser:
    """The parser a benchmark's main() builds, caught at parse time (nothing runs)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def caught(parser, *args, **kwargs):
        raise _Parsed(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", caught), mock.patch.object(sys, "argv", [path.name]):
        try:
            module.main()
        except _Parsed as e:
            return e.parser
    raise AssertionError(f"{path.name}: main() parsed no arguments")


@pytest.fixture(scope="module")
def command_flags(tmp_path_factory) -> dict[str, set[str]]:
    """Flags of every protein-performer subcommand and of protein-performer-prep."""
    from protein_performer.training.lightning_cli import build_cli

    flags = {name: option_strings(build_parser(fn, f"protein-performer {name}")) for name, fn in COMMANDS.items()}
    flags["protein-performer-prep"] = option_strings(build_parser(prep, "protein-performer-prep"))
    data = tmp_path_factory.mktemp("data")
    fit = build_cli(["--config", str(TINY), "--data.data_dir", str(data)], run=False)
    flags["protein-performer fit"] = option_strings(fit.parser)
    return flags


@pytest.fixture(scope="module")
def benchmark_flags(monkeypatch_module) -> dict[str, set[str]]:
    return {f"benchmarks/{p.name}": option_strings(benchmark_parser(p)) for p in BENCHMARKS}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO / "benchmarks"))  # the benchmarks import results_io as scripts do
        yield mp


def concept(flag: str) -> str:
    """The name a flag gives its concept: the last component of --model.config.max_len, without --."""
    return flag.lstrip("-").rsplit(".", 1)[-1]


def check(flags: dict[str, set[str]]) -> None:
    dashed = {cli: sorted(f for f in fs if f.startswith("--") and "-" in f[2:]) for cli, fs in flags.items()}
    assert not any(dashed.values()), f"dashed multi-word flags (use underscores): {dashed}"
    names = {concept(f): cli for cli, fs in flags.items() for f in fs}
    for row in SYNONYMS:
        used = {name: names[name] for name in row if name in names}
        assert len(used) <= 1, f"one concept, several names: {used}"
    old = {cli: sorted(fs & set(RENAMED)) for cli, fs in flags.items()}
    assert not any(old.values()), f"renamed flags still offered: {old}"


def test_one_spelling_per_concept_in_every_command_line(command_flags, benchmark_flags):
    assert "--model.config.max_len" in command_flags["protein-performer fit"]  # the training CLI's names are the model
    assert "--data.max_tokens" in command_flags["protein-performer fit"]
    check({**command_flags, **benchmark_flags})


def test_unknown_letters_have_one_default():
    import inspect

    defaults = {name: inspect.signature(fn).parameters["unknown"].default
                for name, fn in [*COMMANDS.items(), ("prep", prep)] if "unknown" in inspect.signature(fn).parameters}
    assert set(defaults) == {"embed", "score", "prep"} and set(defaults.values()) == {"reject"}


@pytest.mark.parametrize("argv, message", [
    (["analyze", "--max_length", "64"], "protein-performer analyze: error: --max_length was renamed --max_len"),
    (["generate", "--num=2"], "protein-performer generate: error: --num was renamed --num_sequences"),
    (["embed", "--fasta", "x.fasta"], "protein-performer embed: error: --fasta was renamed --input"),
    (["score", "--tokens_per_batch", "9"],
     "protein-performer score: error: --tokens_per_batch was renamed --max_tokens"),
    (["analyze", "--ckpt", "x"], "protein-performer analyze: error: --ckpt was renamed --ckpt_path"),
])
def test_renamed_flags_are_one_line(cli, argv, message):
    code, err = cli(argv)
    assert code == 2 and err.strip() == message


def test_renamed_benchmark_flags_are_one_line(monkeypatch_module, capsys):
    parser = benchmark_parser(REPO / "benchmarks" / "quality.py")
    from results_io import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(parser, ["--max-len", "128"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == (
        f"{parser.prog}: error: --max-len was renamed --max_len")
    assert re.fullmatch(r"\d+", str(parse_args(parser, ["--max_len", "128"]).max_len))
