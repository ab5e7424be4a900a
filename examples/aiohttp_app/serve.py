"""Run the example: `python serve.py` (PORT, HABANERO_* variables optional).

habanero's endpoint is mounted into this app at /_habanero, so pushes go to the app's own port.
"""

import asyncio
import os
import sys
from pathlib import Path

from aiohttp import web

import overlay

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the code on disk, used until the first push

app = web.Application()
ov = overlay.install(
    packages=["hello"],
    trusted_keys=os.environ.get("HABANERO_TRUSTED_KEYS", str(HERE / "trusted_keys")),
    store=os.environ.get("HABANERO_STORE", str(HERE / ".habanero" / "store")),
    app=app,
)

from hello import views  # noqa: E402  (after install: served from the active bundle)

app.add_routes(views.routes)  # the table in hello/views.py: pushes add, move and delete its routes


async def main() -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(os.environ.get("PORT", "8080")))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port} (pid {os.getpid()}, version {ov.version})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
