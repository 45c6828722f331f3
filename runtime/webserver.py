"""`vgg-onnx web`: serve the browser host (runtime/web) and one model on a local address.

The page runs the model itself, with onnxruntime-web (WebAssembly); this server only hands out
files: the page, the shared JavaScript core (runtime/js/vgg-core.js), onnxruntime-web's files from
the npm package runtime/web installs (nothing comes from a CDN), the model as /model.onnx and its
JSON sidecar as /model.json. Every response carries the cross-origin isolation headers
(COOP/COEP) without which a browser gives WebAssembly no threads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click

from vgg_onnx.errors import UsageError
from vgg_onnx.metadata import sidecar_path

__all__ = ["WebFiles", "make_server", "web_command"]

HERE = Path(__file__).resolve().parent
PAGE_DIR = HERE / "web"
CORE_JS = HERE / "js" / "vgg-core.js"
ORT_DIST = PAGE_DIR / "node_modules" / "onnxruntime-web" / "dist"
MAX_MODEL_BYTES = 2**31  # protobuf's own limit for one .onnx file, as in every host
PAGE_FILES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
# onnxruntime-web's WebAssembly build and its loader; nothing else of node_modules is served
ORT_FILE = re.compile(r"^/ort/(ort\.wasm\.min\.mjs|ort-wasm-simd-threaded\.(?:mjs|wasm))$")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".wasm": "application/wasm", ".json": "application/json", ".onnx": "application/octet-stream"}
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cross-Origin-Resource-Policy": "same-origin", "X-Content-Type-Options": "nosniff",
                     "Cache-Control": "no-cache"}


class WebFiles:
    """What the server hands out: URL path -> file on disk (None: not served)."""

    def __init__(self, model: str):
        self.model = model
        self.sidecar = sidecar_path(model)

    def resolve(self, url_path: str) -> Path | None:
        path = url_path.split("?", 1)[0]
        if path in PAGE_FILES:
            return PAGE_DIR / PAGE_FILES[path]
        if path == "/vgg-core.js":
            return CORE_JS
        if path == "/model.onnx":
            return Path(self.model)
        if path == "/model.json":
            return Path(self.sidecar)
        match = ORT_FILE.match(path)
        return ORT_DIST / match.group(1) if match else None


class Handler(BaseHTTPRequestHandler):
    server_version = "vgg-onnx-web"

    def __init__(self, *args, files: WebFiles, **kwargs):
        self.files = files
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_file(head_only=False)

    def do_HEAD(self):  # noqa: N802
        self.send_file(head_only=True)

    def send_file(self, head_only: bool) -> None:
        path = self.files.resolve(self.path)
        try:
            handle = open(path, "rb") if path else None
            if handle and not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                handle.close()
                handle = None
        except OSError:
            handle = None
        if handle is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with handle:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(os.fstat(handle.fileno()).st_size))
            for name, value in ISOLATION_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if not head_only:
                try:
                    shutil.copyfileobj(handle, self.wfile, 1 << 20)
                except (BrokenPipeError, ConnectionResetError):  # the page went away mid-download
                    pass

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass  # one line per file would bury the address; errors reach the page


def check_model(model: str) -> None:
    """A regular file of at most 2 GiB, or UsageError in one line; the page checks the rest."""
    try:
        info = os.stat(model)
    except OSError as e:
        raise UsageError(f"--model {model}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"--model {model}: cannot read: not a regular file")
    if info.st_size > MAX_MODEL_BYTES:
        raise UsageError(f"--model {model}: file of {info.st_size} bytes exceeds the size limit of {MAX_MODEL_BYTES} bytes")


def make_server(model: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for the page and `model`, bound but not yet serving (port 0: any free port)."""
    check_model(model)
    if not (PAGE_DIR / "index.html").is_file():  # a wheel holds the Python package only
        raise UsageError(f"the page is not installed ({PAGE_DIR / 'index.html'} is missing): "
                         "vgg-onnx web runs from a source checkout")
    if not (ORT_DIST / "ort.wasm.min.mjs").is_file():
        raise UsageError("onnxruntime-web is not installed: make host-deps "
                         "(or: cd runtime/web && npm install --ignore-scripts)")
    try:
        return ThreadingHTTPServer((host, port), partial(Handler, files=WebFiles(model)))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@click.command("web")
@click.option("--model", "-m", required=True, metavar="FILE.onnx", help="Exported model the page loads.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default serves this machine only.")
def web_command(model: str, port: int, host: str) -> None:
    """Serve the browser host: classify images in a web page, on the user's machine (onnxruntime-web).

    Prints {"url": ...} on stdout once listening; Ctrl-C stops it.
    """
    server = make_server(model, host, port)
    bound_host, bound_port = server.server_address[:2]
    click.echo(json.dumps({"url": f"http://{bound_host}:{bound_port}/", "model": model}))
    sys.stdout.flush()
    click.echo(f"vgg-onnx web: serving {model} at http://{bound_host}:{bound_port}/ (Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
