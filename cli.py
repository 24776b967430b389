"""Entry point of the programs: a user's mistake ends in one line naming the flag or file:line and exit status 2.

Tracebacks are for bugs, not for a wrong flag or a bad list line: they are kept behind ``--debug`` or
``ADAMAE_DEBUG=1``. Errors raised inside DataLoader workers arrive re-wrapped by torch with the worker's traceback
in the message; the original one-line message is recovered from it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, NoReturn

USAGE_EXIT_CODE = 2


def has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    """Whether ``parser`` already defines ``option`` (flag groups shared by several programs skip those)."""
    return option in parser._option_string_actions  # noqa: SLF001 - argparse has no public lookup


def at_least(low: float, kind: type = int, strict: bool = False) -> Callable[[str], Any]:
    """argparse ``type=`` for a count or size: a ``kind`` number ``>= low`` (``> low`` when ``strict``); anything
    else, NaN included, is argparse's one-line error naming the flag, exit 2 (0 batches per step or a frame stride
    of 0 would crash or silently train on one repeated frame)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not (value > low if strict else value >= low):  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def json_object(text: str) -> dict[str, Any]:
    """argparse ``type=`` for a JSON object flag (``--model_kwargs``): anything else is one line naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 4}}', got {text!r}")
    return value


class UserError(ValueError):
    """A mistake the user can fix (a flag, a list line, a checkpoint, a folder); printed as one line."""


def make_output_dir(path: str | os.PathLike, flag: str) -> str:
    """Create the folder ``path`` (and its parents) to write into; one line naming ``flag`` when it cannot be
    (a file of that name, no permission, a read-only file system) instead of a traceback."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create it ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write into it")
    return str(path)


def construct_with_model_kwargs(create: Callable[..., Any], name: str, model_kwargs: dict[str, Any],
                                **kwargs: Any) -> Any:
    """``create(name, **kwargs, **model_kwargs)`` (``timm.create_model``); a key the constructor does not take
    is a UserError naming ``--model_kwargs``, not a TypeError."""
    try:
        return create(name, **kwargs, **model_kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise UserError(f"--model_kwargs {json.dumps(model_kwargs)}: {name} {str(e).split(') ', 1)[-1]}") from None


def check_model_kwargs(model_kwargs: dict[str, Any], flags: dict[str, str]) -> None:
    """Refuse ``--model_kwargs`` keys that a flag sets (``flags``: constructor argument -> flag): the two would
    collide in the constructor call, or one would silently win."""
    taken = sorted(k for k in model_kwargs if k in flags)
    if taken:
        raise UserError("--model_kwargs sets " + ", ".join(f"{k} (use {flags[k]})" for k in taken) +
                        ": those come from flags")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from checkpoint_loading import CheckpointMismatchError
    from checkpointing import CheckpointError
    # ValueError: bad values from the command line or the lists (datasets raise ValueError("file:line: ...")).
    return (UserError, CheckpointError, CheckpointMismatchError, ValueError, FileNotFoundError)


def one_line(exc: BaseException) -> str:
    """The user-facing message of ``exc``; for torch's ``Caught X in DataLoader worker ...`` wrapper, the
    original exception's message."""
    msg = str(exc)
    if msg.startswith("Caught ") and "\nOriginal Traceback" in msg:
        last = [x for x in msg.strip().splitlines() if x.strip()][-1]
        name, _, text = last.partition(": ")
        return text if text and " " not in name else last
    return msg


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag with its default; an on/off flag says "default: off" (not the value of the attribute it
    clears: ``--use_cls`` stores False into ``use_mean_pooling``, whose default True would read as "on")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, argparse._HelpAction) or "default:" in text:  # says its own default
            return text
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):  # store_true/false/const
            return f"{text} (default: {'on' if action.default == action.const else 'off'})"
        return super()._get_help_string(action) or ""


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors (also: environment variable ADAMAE_DEBUG=1)")


def run_program(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
                argv: list[str] | None = None) -> NoReturn:
    """Parse ``argv`` and run ``main``; user errors print ``error: ...`` and exit 2."""
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("ADAMAE_DEBUG", "") not in ("", "0")
    try:
        main(args)
    except _user_error_types() as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT_CODE)
    sys.exit(0)
