"""Run the example: `python serve.py`. The app serves on PORT; habanero listens on HABANERO_LISTEN.

The upgrade is applied on habanero's own thread while this server's thread keeps serving; a request
that is being handled finishes on the code it started with, the next one runs the new code.
"""

import os
import sys
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import overlay

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ov = overlay.install(
    packages=["counter"],
    trusted_keys=os.environ.get("HABANERO_TRUSTED_KEYS", str(HERE / "trusted_keys")),
    store=os.environ.get("HABANERO_STORE", str(HERE / ".habanero" / "store")),
    listen=os.environ.get("HABANERO_LISTEN", "127.0.0.1:8765"),
)

import counter  # noqa: E402


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):  # keep the demo output readable
        pass


def app(environ, start_response):
    return counter.application(environ, start_response)  # looked up per request


def control_url() -> str:
    """Where habanero-pack pushes: the address habanero's server really bound (port 0 picks one)."""
    if ov.address is None:
        return "nowhere (habanero is disabled)"
    scheme = "https" if ov.control.get("tls_cert") else "http"
    return f"{scheme}://{ov.address[0]}:{ov.address[1]}"


if __name__ == "__main__":
    with make_server("127.0.0.1", int(os.environ.get("PORT", "8000")), app, handler_class=QuietHandler) as server:
        print(f"listening on http://127.0.0.1:{server.server_port} (pid {os.getpid()}, "
              f"habanero on {control_url()}, version {ov.version})", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
