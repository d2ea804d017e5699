"""Command lines generated from typed function signatures and their docstrings (jsonargparse), one style for
every non-training command (prep, analyze, embed, score, generate, report); fit/validate/test are LightningCLI.

Flags are the parameter names, with underscores (`--max_len 512`, as LightningCLI's `--trainer.max_steps`); a bool
parameter is a switch (`--overwrite`, `--no_overwrite`), a required list is positional (`INPUT [INPUT ...]`), an
optional list takes one or more values (`--layers 2 4`), a fixed-size tuple exactly that many (`--head 1 3`). Argument
errors exit 2 with usage (argparse's convention); a UserError raised by the command prints `PROG: error: ...`
and exits 2 too. One concept has one name in every command and benchmark (tests/test_flags.py); a renamed flag
stops with a line naming its new spelling.
"""

from __future__ import annotations

import inspect
import logging
import sys
import typing
from collections.abc import Callable, Sequence

import docstring_parser
from jsonargparse import ActionYesNo, ArgumentParser

from .errors import UserError


def build_parser(fn: Callable, prog: str) -> ArgumentParser:
    """An ArgumentParser for `fn`'s parameters, with help from its docstring (Google style)."""
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    helps = {p.arg_name: p.description for p in doc.params}
    hints = typing.get_type_hints(fn)
    description = "\n\n".join(filter(None, [doc.short_description, doc.long_description]))
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=True)
    manual = {}
    for name, param in inspect.signature(fn).parameters.items():
        kwargs = _argparse_style(hints[name], param.default)
        if kwargs is not None:
            manual[name] = kwargs
    parser.add_function_arguments(fn, skip=set(manual), as_group=False, fail_untyped=True)
    for name, kwargs in manual.items():
        default = inspect.signature(fn).parameters[name].default
        positional = default is inspect.Parameter.empty and kwargs.get("nargs") == "+"
        flag = name if positional else f"--{name}"
        extra = {} if positional else {"default": default}
        if not positional and default is inspect.Parameter.empty:
            extra = {"required": True}
        parser.add_argument(flag, help=helps.get(name), **kwargs, **extra)
    return parser


def _argparse_style(hint, default) -> dict | None:
    """argparse keywords for the parameters that read better the Unix way than as jsonargparse values."""
    hint = _strip_optional(hint)
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if hint is bool:
        return {"action": ActionYesNo(no_prefix="no_")}
    if origin is list and len(args) == 1 and args[0] in (str, int, float):
        return {"nargs": "+", "type": args[0]}
    if origin is tuple and args and Ellipsis not in args and len(set(args)) == 1 and args[0] in (str, int, float):
        return {"nargs": len(args), "type": args[0]}
    return None


class _Formatter(logging.Formatter):
    """`PROG: warning: message` (INFO: `PROG: note: message`), as argparse words its errors."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        kind = "note" if record.levelno == logging.INFO else record.levelname.lower()
        return f"{self.prog}: {kind}: {record.getMessage()}"


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is at the time (a StreamHandler would keep the stream it started with),
    through tqdm while a bar may be running, so that a message does not break the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is not None:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        else:
            print(self.format(record), file=sys.stderr)


_HANDLER = _Stderr()
LOGGERS = ("protein_performer",)  # the package (prep included) whose messages every command shows


def log_to_stderr(prog: str) -> None:
    """Show what the packages log (skipped records, cropped sequences, notes) as `PROG: warning: ...` on stderr:
    the one channel of every command's messages besides its errors."""
    _HANDLER.setFormatter(_Formatter(prog))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _NoBar:
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(items=None, desc: str = "", unit: str = "seq", progress: bool | None = None, total=None,
                 unit_scale: bool = False):
    """The progress bar of every command: tqdm on stderr over `items`, or updated by hand up to `total`.
    progress None: shown on a terminal only; without a bar tqdm is not even imported (70 ms of a prep's start)."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return _NoBar(items)
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr)


# Old spellings -> the one name of their concept (lengths in tokens incl. BOS, as Config.max_len counts them).
RENAMED = {"--max_length": "--max_len", "--fasta": "--input", "--ckpt": "--ckpt_path",
           "--tokens_per_batch": "--max_tokens", "--num": "--num_sequences", "--proteins": "--num_sequences",
           "--features": "--nb_features"}


def refuse_renamed(argv: Sequence[str], flags: set[str], prog: str, renamed: dict[str, str] | None = None) -> None:
    """Stop with `PROG: error: --old was renamed --new` (exit status 2) when `argv` uses a renamed flag of a
    command whose flags are `flags`: an old name in RENAMED (or `renamed`, the command's own), or a dashed
    spelling (--max-len for --max_len)."""
    for arg in argv:
        old = arg.split("=", 1)[0]
        if not old.startswith("--") or old in flags:
            continue
        new = {**RENAMED, **(renamed or {})}.get(old, "--" + old[2:].replace("-", "_"))
        if new in flags:
            print(f"{prog}: error: {old} was renamed {new}", file=sys.stderr)
            sys.exit(2)


def option_strings(parser) -> set[str]:
    """Every flag an (argparse or jsonargparse) parser accepts."""
    return {flag for action in parser._actions for flag in action.option_strings}


def run(fn: Callable, argv: Sequence[str], prog: str) -> None:
    """Parse `argv` for `fn`, call it; UserError -> `PROG: error: ...` on stderr and exit status 2."""
    log_to_stderr(prog)
    parser = build_parser(fn, prog)
    refuse_renamed(argv, option_strings(parser), prog)
    args = parser.parse_args(list(argv))
    kwargs = {k: v for k, v in vars(args).items() if k in inspect.signature(fn).parameters}
    for name, value in kwargs.items():  # nargs=N options arrive as lists
        if isinstance(value, list) and typing.get_origin(_strip_optional(typing.get_type_hints(fn)[name])) is tuple:
            kwargs[name] = tuple(value)
    try:
        fn(**kwargs)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def _strip_optional(hint):
    """X for X | None, else the hint itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(hint) and len(args) == 1 else hint
