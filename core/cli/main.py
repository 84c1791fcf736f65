"""Entry point of the `vlbridge` command: parse, dispatch, and turn user errors into exit code 2."""

from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import sys
import traceback

from vlbridge.cli import cache, convert, demo, evaluate, listing, run, train, validate, world
from vlbridge.cli.output import plain_warnings
from vlbridge.errors import VLBridgeError
from vlbridge.parts.hf_quiet import quiet_hf

SUBCOMMAND_MODULES = (demo, listing, validate, run, convert, train, cache, world, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlbridge",
        description="Bridge a frozen image encoder and a frozen LLM with a trainable connector (BLIP-2 style).",
    )
    parser.add_argument("--version", action="version", version=f"vlbridge {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        module.add_parsers(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost parser `args` chose (`world generate`'s, not `world`'s, whose usage lists only
    its actions); the top-level parser when no subcommand was given."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if isinstance(chosen, str) and chosen in action.choices:
                return _subparser(action.choices[chosen], args)
    return parser


def _version() -> str:
    from vlbridge import __version__

    return __version__


USER_PATH_ERRORS = (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def path_problem(exc: OSError) -> str:
    """A file-system error about a user's path as one sentence that says what would be right."""
    where = exc.filename if exc.filename is not None else "a path"
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return (f"cannot create a directory at or under {where!s}: a file stands in the way ({exc.strerror}); "
                "give an output path that is a directory or does not exist yet")
    if isinstance(exc, IsADirectoryError):
        return f"{where!s} is a directory where a file is needed; give the path of a file"
    if exc.errno == errno.ENAMETOOLONG:  # a value of a config or flag read as a path: name the start of it, not all of it
        shown = str(where) if len(str(where)) <= 80 else f"{str(where)[:60]}... ({len(str(where))} characters)"
        return f"the path {shown!r} is too long for the file system; give a shorter one (at most 255 bytes a name)"
    return f"no permission to use {where!s} ({exc.strerror}); give a path you can write to"


SIGPIPE_STATUS = 141  # what a shell reports for a command killed by SIGPIPE (128 + 13)


def stdout_closed() -> bool:
    """Whether stdout's reader has gone (`vlbridge components | head`): then the output is unwanted,
    not a bug. A broken pipe elsewhere (a data loader's worker) is not this. Further writes, and the
    interpreter's flush at exit, go to the null device."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (AttributeError, OSError, ValueError):  # no poll here, or stdout is not a file descriptor
        return False
    if not any(events & select.POLLERR for _, events in poller.poll(0)):  # a pipe's writer gets POLLERR once no reader is left
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        # an unknown flag belongs to the subcommand: its usage, not the top-level one, says what is right
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extras)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        with quiet_hf(), plain_warnings(args.command):  # vlbridge's output is vlbridge's: no transformers / hub progress bars
            status = int(args.func(args) or 0)
            sys.stdout.flush()  # here, so that a reader gone early is seen below, not at exit
            return status
    except VLBridgeError as exc:
        print(f"vlbridge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError as exc:
        return SIGPIPE_STATUS if stdout_closed() else internal_error(args.command, exc)
    except OSError as exc:
        # a path the user gave (or one under it) is of the wrong kind, not writable, or a string of a
        # config too long to be a file name (Path.exists raises for it): theirs to fix
        if not isinstance(exc, USER_PATH_ERRORS) and exc.errno != errno.ENAMETOOLONG:
            return internal_error(args.command, exc)
        print(f"vlbridge {args.command}: error: {path_problem(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        return internal_error(args.command, exc)


def internal_error(command: str, exc: Exception) -> int:
    """A bug, not a user error: say so, keep the traceback opt-in."""
    if os.environ.get("VLBRIDGE_DEBUG"):
        traceback.print_exception(exc)
    print(f"vlbridge {command}: internal error: {type(exc).__name__}: {exc}\n"
          "This is a bug in vlbridge or a plugin; rerun with VLBRIDGE_DEBUG=1 for the traceback.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
