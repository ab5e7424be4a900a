"""The command line's vocabulary: options several verbs share, and how they are spelled.

Kept apart from ``packer.cli`` (which assembles the parser) and ``packer.commands`` (which runs the
verbs), so that every module a verb needs can import these without importing the CLI itself.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["APP_ID", "CA_FILE", "JSON", "KEY", "PACKAGES", "PROG", "PROJECT", "SHARED", "URL", "Argument",
           "UsageError", "arg", "positive_int"]

PROG = "habanero-pack"

#: One ``add_argument`` call, as data: its flags and its options.
Argument = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **options: Any) -> Argument:
    """One ``add_argument`` call, as data."""
    return flags, options


class UsageError(Exception):
    """The command line itself is wrong; printed as one line, exit status 2."""


def positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{flag} takes a positive integer, not {text!r}")
    return value


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
JSON = arg("--json", action="store_true", help="print JSON for scripts")
URL = arg("url", nargs="?", metavar="URL", help="the app's URL (default: HABANERO_URL, [tool.habanero] url)")
#: Options the top level takes as well (for ``--push``), so they may come before or after a verb.
SHARED = (PROJECT, APP_ID, PACKAGES, KEY, CA_FILE, JSON)
