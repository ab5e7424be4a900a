"""The app's entry point: `uvicorn asgi:app --workers 4` (or any ASGI server).

It sits outside the `api` package, so that `install()` runs before anything of `api` is imported;
every worker runs these lines, and every worker takes part in every push.
"""

import os
import sys
from pathlib import Path

import overlay

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the code on disk, used until the first push

ov = overlay.install(
    packages=["api"],
    trusted_keys=os.environ.get("HABANERO_TRUSTED_KEYS", str(HERE / "trusted_keys")),
    store=os.environ.get("HABANERO_STORE", str(HERE / ".habanero" / "store")),
)

from api.main import api  # noqa: E402  (after install: served from the active bundle)

app = ov.asgi(api)
