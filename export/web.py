"""MAGNeT in a web page: the page files written into an export folder, and a local server for trying it.

`write_page(DIR)` puts the page beside the graphs (`magnet export --web` calls it): DIR/index.html and DIR/web/ (the
page's module, the shared client export/node/magnet.mjs, the conformance runner, and onnxruntime-web's and the
tokenizer's browser builds from export/node/node_modules). The folder is then static files for any server; WASM
threads need the page to be cross-origin isolated, which `serve` arranges with the COOP/COEP headers:

    python -m magnet_engine.export.web DIR [--port 8000]   # writes/refreshes the page, serves DIR on 127.0.0.1
"""
from __future__ import annotations

import argparse
import filecmp
import functools
import shutil
import sys
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parent / "node"
PAGE = "index.html"
ASSETS = "web"
# what the page loads from NODE_DIR: (source, destination relative to the export folder)
_CLIENT = [("index.html", PAGE), ("app.mjs", f"{ASSETS}/app.mjs"), ("magnet.mjs", f"{ASSETS}/magnet.mjs"),
           ("conformance.mjs", f"{ASSETS}/conformance.mjs")]
# plain WASM (ort.wasm) and the WebGPU-capable build (ort.min, JSEP), each with its own runtime, plus the tokenizer
_VENDOR = [f"onnxruntime-web/dist/{name}" for name in (
    "ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
    "ort.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")] + [
    "@huggingface/tokenizers/dist/tokenizers.mjs"]


def page_files() -> list[tuple[Path, str]]:
    """(source file, its path in the export folder) for every file of the page."""
    modules = NODE_DIR / "node_modules"
    missing = [name for name in _VENDOR if not (modules / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the page's browser packages are missing ({missing[0]}): run "
                                f"`ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix {NODE_DIR}`")
    return [(NODE_DIR / src, dst) for src, dst in _CLIENT] + [
        (modules / name, f"{ASSETS}/vendor/{Path(name).name}") for name in _VENDOR]


def write_page(export_dir: str | Path) -> list[Path]:
    """Write (or refresh: files whose bytes differ) the page into a `magnet export` folder. -> the files written."""
    out = Path(export_dir)
    if not (out / "manifest.json").is_file():
        raise ValueError(f"{out} is not a MAGNeT ONNX export (no manifest.json); create one with "
                         "`magnet export --model MODEL --out DIR --web`")
    written = []
    for src, dst in page_files():
        target = out / dst
        if target.is_file() and filecmp.cmp(src, target, shallow=False):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        written.append(target)
    return written


class IsolatedHandler(SimpleHTTPRequestHandler):
    """Static files with the headers that make the page cross-origin isolated (SharedArrayBuffer: WASM threads)."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)


class IsolatedServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: tuple) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # a browser that left mid-download (a reload): not news
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


def make_server(export_dir: str | Path, port: int = 8000, verbose: bool = False) -> ThreadingHTTPServer:
    """A server of the folder on 127.0.0.1:port (0: any free port; see server.server_address)."""
    root = Path(export_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    server = IsolatedServer(("127.0.0.1", port), functools.partial(IsolatedHandler, directory=str(root)))
    server.verbose = verbose  # type: ignore[attr-defined]
    return server


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.export.web",
                                description="Write the MAGNeT page into an export folder and serve it on 127.0.0.1 "
                                "with the cross-origin isolation headers (WASM threads)")
    p.add_argument("dir", help="a `magnet export` folder")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000; 0: any free one)")
    p.add_argument("--no-serve", action="store_true", help="only write the page files")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    try:
        written = write_page(args.dir)
        if args.no_serve:
            print(f"wrote the page into {args.dir} ({len(written)} files changed)")
            return 0
        server = make_server(args.dir, args.port, args.verbose)
    except (ValueError, OSError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"serving {args.dir} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
