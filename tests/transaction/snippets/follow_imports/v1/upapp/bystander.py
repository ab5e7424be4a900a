"""Imports nothing the pushes change: a push has no reason to read it again."""

import os

SEP = os.sep
