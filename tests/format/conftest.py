"""Fixtures for the bundle format: ``base``, the active bundle a push is opened against."""

from __future__ import annotations

import pytest
from support.bundles import open_base

from overlay.bundle import Bundle


@pytest.fixture
def base(signing_key, trusted) -> Bundle:
    return open_base(signing_key, trusted)
