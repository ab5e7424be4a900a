"""habanero-pack: build, sign and push hot code deploys to a running Python app.

  habanero-pack --push [URL]                           build, sign, push and confirm the next version
  habanero-pack --push --watch [URL] [--check CMD]     push on every save
  habanero-pack status | history [URL]                 what the app runs, and its deploys
  habanero-pack rollback [URL] [--to N]                back to the previous (or a named) version
  habanero-pack keygen [--out PATH]                    create a deploy key pair
  habanero-pack build [-o FILE] [--version N]          build a signed bundle of this project
  habanero-pack inspect FILE [--trusted-keys FILE]     show a bundle and check its signature

Settings come from the flags, then HABANERO_* environment variables, then [tool.habanero] in the
project's pyproject.toml (see packer/config.py).
"""

from __future__ import annotations

# Only light imports up here: the whole command, interpreter start included, is on the
# save-to-live path. Each command imports what it needs.
import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["main"]

PROG = "habanero-pack"
_LOGGERS = ("packer", "overlay")

Handler = Callable[[argparse.Namespace], int]
Argument = tuple[tuple[str, ...], dict]


class _Command:
    __slots__ = ("name", "run", "help", "arguments")

    def __init__(self, name: str, run: Handler, help: str, arguments: tuple[Argument, ...]) -> None:
        self.name, self.run, self.help, self.arguments = name, run, help, arguments


#: Subcommands by name, in the order ``--help`` lists them. Add one with ``@command(...)``.
COMMANDS: dict[str, _Command] = {}


def command(name: str, *arguments: Argument, help: str) -> Callable[[Handler], Handler]:
    """Register ``habanero-pack NAME``: its handler gets the parsed arguments, returns the exit code."""

    def register(run: Handler) -> Handler:
        COMMANDS[name] = _Command(name, run, help, arguments)
        return run

    return register


def arg(*flags: str, **options: object) -> Argument:
    """One ``add_argument`` call, as data."""
    return flags, options


class UsageError(Exception):
    """The command line itself is wrong; printed as one line, exit status 2."""


# Arguments several commands share.
PROJECT = arg("--project", metavar="DIR", help="project directory (default: the nearest parent "
              "directory with a pyproject.toml)")
APP_ID = arg("--app-id", metavar="ID", help="app id (default: HABANERO_APP_ID, [tool.habanero] "
             "app_id, the first package)")
PACKAGES = arg("--packages", metavar="A,B", help="comma-separated top-level packages to ship "
               "(default: HABANERO_PACKAGES, [tool.habanero] packages)")
KEY = arg("--key", metavar="PATH", help="signing key (default: HABANERO_KEY, [tool.habanero] key, "
          ".habanero/deploy_key, ~/.ssh/id_ed25519)")
CA_FILE = arg("--ca-file", metavar="FILE", help="CA certificate(s) to trust for an https:// URL "
              "(default: HABANERO_CA_FILE, [tool.habanero] ca_file, the system's CAs)")
JSON = arg("--json", action="store_true", help="print JSON (with --push: the push's result)")
#: Options the top level takes (for --push) as well as the commands that list them.
SHARED = (PROJECT, APP_ID, PACKAGES, KEY, CA_FILE, JSON)


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
                        help="build, sign and deploy to the running app at URL (default: HABANERO_URL, "
                             "[tool.habanero] url)")
    parser.add_argument("--watch", action="store_true",
                        help="with --push: push again on every save, until Ctrl-C; pushes first when the app "
                             "runs other code than the project's")
    parser.add_argument("--check", metavar="CMD", help="with --watch: run CMD (a shell command, in the project "
                        "directory) before each push; when it fails the push is skipped and its output shown")
    parser.add_argument("--debounce", type=lambda s: _positive_int(s, "--debounce"), metavar="MS",
                        help="with --watch: group saves made within MS milliseconds into one push (default 20)")
    _add_verbosity(parser, default=0)
    for flags, options in SHARED:  # what --push needs; commands that take them accept them too
        parser.add_argument(*flags, **options)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        child = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for flags, options in cmd.arguments:
            # A shared option given before the command must survive the command's own default.
            shared = any(flags is f for f, _ in SHARED)
            child.add_argument(*flags, **({**options, "default": argparse.SUPPRESS} if shared else options))
        _add_verbosity(child, default=argparse.SUPPRESS)  # `build -q` works as well as `-q build`
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=default, help="say more (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=default, help="only print errors")


def _dispatch(args: argparse.Namespace) -> int:
    if args.push is not None or args.watch or args.check is not None or args.debounce is not None:
        return _push(args)
    if args.command is None:
        raise UsageError(f"choose a command: {', '.join(COMMANDS)} (or --push); see {PROG} --help")
    return COMMANDS[args.command].run(args)


def _push(args: argparse.Namespace) -> int:
    """``--push [URL]`` and ``--watch``: the control plane's entry point."""
    if not args.watch and (args.check is not None or args.debounce is not None):
        raise UsageError("--check and --debounce go with --watch: habanero-pack --push --watch --check CMD")
    if args.command is not None:
        raise UsageError(f"--push builds and deploys by itself; drop the {args.command!r} command")
    if args.push is None:
        raise UsageError("--watch goes with --push: habanero-pack --push --watch [URL]")
    if args.watch:
        from .watch import run_watch

        return run_watch(args)
    from .deploy import run_push

    return run_push(args)


# ------------------------------------------------------------------------------------ commands


@command(
    "keygen",
    arg("--out", metavar="PATH", help="private key path; the public key goes to PATH.pub "
        "(default: .habanero/deploy_key in the project)"),
    arg("--comment", metavar="TEXT", help="comment on the public key line (default: user@host)"),
    arg("--force", action="store_true", help="overwrite an existing key pair"),
    PROJECT,
    help="create a deploy key pair (OpenSSH ed25519)",
)
def _keygen(args: argparse.Namespace) -> int:
    from overlay.keys import generate_signing_key

    from .config import PROJECT_KEY

    default = _keygen_home(args.project) / PROJECT_KEY
    path = Path(args.out).expanduser().absolute() if args.out else default
    key = generate_signing_key(path, comment=args.comment or _user_at_host(), overwrite=args.force)
    shown = _display(path)
    print(f"wrote {shown} (private key, mode 0600) and {shown}.pub")
    print(f"key id {key.key_id}")
    print(key.public.line())
    print(f"\nAdd the ssh-ed25519 line above to the app's trusted keys file (what the running app "
          f"passes to overlay.install() as trusted_keys=, or HABANERO_TRUSTED_KEYS), e.g.\n"
          f"  cat {shown}.pub >> path/to/trusted_keys")
    if path == default:
        print("habanero-pack signs with it in this project unless --key, HABANERO_KEY or `key` in "
              "[tool.habanero] names another. Keep the private key out of version control.")
    else:
        print(f"To sign with it, set key = \"{shown}\" in [tool.habanero] or HABANERO_KEY={shown}. "
              "Keep the private key out of version control.")
    return 0


@command(
    "build",
    arg("-o", "--output", metavar="FILE", help="where to write the bundle (default: APP_ID-vN.hbn)"),
    arg("--version", dest="bundle_version", type=lambda s: _positive_int(s, "--version"), default=1,
        metavar="N", help="the bundle's version, higher than any the app accepted (default: 1)"),
    KEY, PROJECT, APP_ID, PACKAGES,
    help="build a signed bundle of the project's packages",
)
def _build(args: argparse.Namespace) -> int:
    from overlay.keys import load_signing_key

    from .build import build

    config = _load_config(args)
    signer = load_signing_key(config.require_key())  # before the work: a passphrase prompt comes first
    built = build(config, version=args.bundle_version, signer=signer)
    out = built.write(args.output or f"{config.app_id}-v{args.bundle_version}.hbn")
    print(f"wrote {_display(out)}: {config.app_id} v{built.version}, {built.entries} entries, "
          f"{_size(built.size)} ({_size(built.uncompressed_size)} unpacked, ratio {built.ratio:.1f}), "
          f"key {built.key_id}, {built.timings['total']:.0f} ms")
    return 0


@command(
    "inspect",
    arg("file", metavar="FILE", help="a bundle file"),
    arg("--trusted-keys", metavar="FILE",
        help="verify against this authorized_keys-style file (default: HABANERO_TRUSTED_KEYS)"),
    arg("--json", action="store_true", help="print the manifest and verdict as JSON"),
    help="show a bundle's manifest and check its signature",
)
def _inspect(args: argparse.Namespace) -> int:
    from overlay.keys import load_trusted_keys

    from .build import inspect_bundle

    data = Path(args.file).read_bytes()
    source = args.trusted_keys or os.environ.get("HABANERO_TRUSTED_KEYS", "").strip()
    trusted = load_trusted_keys(source) if source else None
    report = inspect_bundle(data, trusted)
    if args.json:
        import json

        print(json.dumps(_inspection_json(args.file, report, trusted), indent=2))
    else:
        print(_format_inspection(args.file, report, trusted))
    if report.refusal is not None:
        return _fail(f"{report.refusal.code}: {report.refusal.message}", 1)
    return 0


# ------------------------------------------------------------------------------------- helpers


def _load_config(args: argparse.Namespace):  # -> ProjectConfig
    from .config import load_config

    url = getattr(args, "push", None) or None  # "" is --push without a URL: the configured one
    return load_config(
        args.project,
        app_id=args.app_id,
        packages=[p.strip() for p in args.packages.split(",") if p.strip()] if args.packages else None,
        key=args.key,
        url=url,
        ca_file=args.ca_file,
    )


def _keygen_home(project: str | None) -> Path:
    """The project root when there is one (``--project`` or a pyproject above), else the cwd."""
    from overlay.errors import ConfigError

    from .config import find_project

    try:
        return find_project(project)
    except ConfigError:
        if project is not None:
            raise
        return Path.cwd()


def _user_at_host() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "habanero"
    return f"{user}@{socket.gethostname()}"


def _format_inspection(file: str, report, trusted) -> str:
    m, payload = report.manifest, report.manifest["payload"]
    entries = m["entries"]
    kinds = {k: sum(e["kind"] == k for e in entries) for k in ("package", "module", "data")}
    ratio = payload["uncompressed_size"] / payload["size"] if payload["size"] else 0.0
    lines = [
        f"file       {file} ({_size(report.size)})",
        f"app        {m['app_id']}",
        f"version    {m['version']}",
        f"parent     {m['parent'] or 'none'}",
        f"digest     {report.digest}",
        f"created    {m['created']}",
        f"builder    {_describe_builder(m['builder'])}",
        f"payload    {payload['codec']}, {_size(payload['size'])}, {_size(payload['uncompressed_size'])} "
        f"unpacked (ratio {ratio:.1f})",
        f"signature  {_verdict(report, trusted)}",
        f"entries    {len(entries)}: {kinds['package']} packages, {kinds['module']} modules, "
        f"{kinds['data']} data files",
    ]
    width = max([4] + [len(_size(e["size"])) for e in entries])
    lines.append(f"  {'KIND':<8} {'SIZE':>{width}}  NAME")
    lines += [f"  {e['kind']:<8} {_size(e['size']):>{width}}  {e['name']}" for e in entries]
    return "\n".join(lines)


def _describe_builder(builder: dict) -> str:
    who = "@".join(str(builder[k]) for k in ("user", "host") if builder.get(k)) or "unknown"
    commit = builder.get("git_commit")
    git = f"git {commit[:12]}{' (dirty)' if builder.get('git_dirty') else ''}" if commit else "not from git"
    return f"{who}, {git}, habanero {builder.get('habanero', '?')}"


def _verdict(report, trusted) -> str:
    if not report.checked:
        return f"not checked: pass --trusted-keys FILE (claims {', '.join(report.claimed_key_ids)})"
    if report.refusal is not None:
        return f"REFUSED {report.refusal.code}: {report.refusal.message}"
    named = [f"{kid} ({trusted.get(kid).comment})" if trusted.get(kid).comment else kid
             for kid in report.verified_by]
    return f"verified with {', '.join(named)}, trusted in {trusted.source}"


def _inspection_json(file: str, report, trusted) -> dict:
    refusal = report.refusal
    return {
        "file": file,
        "size": report.size,
        "digest": report.digest,
        "signature": {
            "checked": report.checked,
            "verified": report.verified,
            "verified_by": list(report.verified_by),
            "claimed_key_ids": list(report.claimed_key_ids),
            "trusted_keys": trusted.source if trusted is not None else None,
            "refusal": None if refusal is None else {"code": refusal.code, "message": refusal.message},
        },
        "manifest": report.manifest,
    }


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{flag} takes a positive integer, not {text!r}")
    return value


def _display(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the cwd when it is below it, for messages."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog.removeprefix(PROG).strip() + ': ' if self.prog != PROG else ''}"
                         f"{message} (see {self.prog} --help)")


class _LazyVersion(argparse.Action):
    """``--version`` without importing habanero until it is asked for."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
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


# The deploy commands (status, history, rollback) register themselves; kept in their own module.
from . import deploy as _deploy  # noqa: E402,F401
