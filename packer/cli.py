"""habanero-pack: build, sign and push hot code deploys to a running Python app.

  habanero-pack push [URL] [--watch] [--check CMD]     build, sign, push and confirm the next version
  habanero-pack status | history [URL]                 what the app runs, and its deploys
  habanero-pack rollback [URL] [--to N]                back to the previous (or a named) version
  habanero-pack build [-o FILE] [--bundle-version N]   build a signed bundle file, without pushing
  habanero-pack inspect FILE [--trusted-keys FILE]     show a bundle and check its signature
  habanero-pack keygen [--out PATH]                    create a deploy key pair
  habanero-pack --push [URL] [--watch]                 the same as `push`

Settings come from the flags, then HABANERO_* environment variables, then [tool.habanero] in the
project's pyproject.toml (see packer/config.py). Outside any project, status, history and rollback
take the URL, --app-id and --key (or HABANERO_URL, HABANERO_APP_ID, HABANERO_KEY).
"""

from __future__ import annotations

# Only light imports up here: the whole command, interpreter start included, is on the
# save-to-live path. Each verb imports what it needs when it runs.
import argparse
import logging
import os
import sys
from typing import Any, NoReturn

from .args import PROG, SHARED, UsageError
from .commands import PUSH_ARGUMENTS, VERBS

__all__ = ["main"]

_LOGGERS = ("packer", "overlay")


def main(argv: list[str] | None = None) -> int:
    """Run habanero-pack with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except SystemExit as exc:  # --help and --version print and exit
        return exc.code if isinstance(exc.code, int) else 0
    from overlay.errors import HabaneroError

    handler = _attach_log_handler(args.verbose - args.quiet)
    try:
        return _dispatch(args)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except HabaneroError as exc:
        return _fail(exc.message, 1)
    except BrokenPipeError:
        # The reader went away (``habanero-pack history | head``): stop quietly, and let nothing
        # else try to write to the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        return _fail(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    finally:
        _detach_log_handler(handler)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_LazyVersion, nargs=0, help="print habanero's version and exit")
    parser.add_argument("--push", nargs="?", const="", metavar="URL",
                        help="the same as the push command (build, sign and deploy to the app at URL)")
    _add_verbosity(parser, default=0)
    top: set[str] = {"push", "version", "verbose", "quiet"}
    for flags, options in (*SHARED, *(a for a in PUSH_ARGUMENTS if a[0][0].startswith("--") and a not in SHARED)):
        action = parser.add_argument(*flags, **options)  # what --push needs, before any verb
        top.add(action.dest)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in VERBS.values():
        child = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        for flags, options in verb.arguments:
            action = child.add_argument(*flags, **options)
            if action.dest in top:
                # Given before the verb (``-q push``, ``--key K status``), the value must survive the
                # verb's own default: the verb's parser then sets nothing unless it is given there.
                action.default = argparse.SUPPRESS
        _add_verbosity(child, default=argparse.SUPPRESS)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=default, help="say more (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=default, help="print only errors")


def _dispatch(args: argparse.Namespace) -> int:
    if args.push is not None:
        if args.command is not None:
            raise UsageError(f"--push is the push command itself; drop the {args.command!r} command")
        args.url = args.push or None
        return VERBS["push"].run(args)
    if args.command is None:
        if args.watch or args.check is not None or args.debounce is not None:
            raise UsageError("--watch goes with push: habanero-pack push --watch [URL]")
        raise UsageError(f"choose a command: {', '.join(VERBS)} (or --push); see {PROG} --help")
    if args.command != "push" and (args.watch or args.check is not None or args.debounce is not None):
        raise UsageError("--check and --debounce go with --watch, and --watch with push: habanero-pack push "
                         "--watch [--check CMD]")
    return VERBS[args.command].run(args)


def _fail(message: str, status: int) -> int:
    from .output import printable

    print(f"{PROG}: error: {printable(' '.join(message.split()))}", file=sys.stderr)
    return status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog.removeprefix(PROG).strip() + ': ' if self.prog != PROG else ''}"
                         f"{message} (see {self.prog} --help)")


class _LazyVersion(argparse.Action):
    """``--version`` without importing habanero until it is asked for."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from overlay import __version__

        print(f"{PROG} {__version__}")
        parser.exit()


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


def _attach_log_handler(verbosity: int) -> tuple[logging.Handler, list[int]]:
    """Send packer's and overlay's log records to stderr; undone by :func:`_detach_log_handler`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(-1, min(verbosity, 2)), logging.DEBUG)
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append(logger.level)
        logger.setLevel(level)
        logger.addHandler(handler)
    return handler, saved


def _detach_log_handler(state: tuple[logging.Handler, list[int]]) -> None:
    handler, saved = state
    for name, level in zip(_LOGGERS, saved):
        logger = logging.getLogger(name)
        logger.removeHandler(handler)
        logger.setLevel(level)
