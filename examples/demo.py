"""Placeholder until the control plane lands: says what is missing instead of pretending to work."""

import sys

print(
    "make demo: the live demo (push, change served without restart, rollback) needs the control\n"
    "plane (HTTP push/rollback endpoints and `habanero-pack --push`), which is not built yet.\n"
    "What works today: `habanero-pack keygen`, `habanero-pack build`, `habanero-pack inspect`,\n"
    "and `make test`.",
    file=sys.stderr,
)
sys.exit(2)
