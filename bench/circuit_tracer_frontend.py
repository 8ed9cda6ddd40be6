"""Does circuit-tracer's own frontend draw our exported graph? Count the nodes it renders.

Starts circuit-tracer's graph server (its ``CircuitGraphHandler``, from a virtual environment with
circuit-tracer 0.5.0 installed) on 127.0.0.1 over a folder written by
``graph.save(folder, format="circuit-tracer")``, opens its ``index.html`` in Chromium with
Playwright, and counts the node marks (``.link-graph text.node``) drawn for the graph.

Its page loads d3, its "jetpack" d3 helpers, dagre and pako from CDNs this machine cannot reach; they
are served from the npm registry's packages instead (into a cache folder), through Playwright's
request routing: transformer-circuits.pub's ``d3.js`` is ``d3@7``; its ``jetpack_2024-07-20.js``
is ``d3@7`` with ``d3-jetpack@2.3.0`` bundled by esbuild into one ``window.d3``, jetpack's selection
methods applied to d3 7's selections too (jetpack patches d3-selection 1, its peer dependency, and
its own ``d3v7+jetpack`` build patches a copy of d3-selection other than the one it exports); unpkg's
dagre and pako are the same versions from npm. Its hot-reload client and ``.npy`` reader (unused
for graphs) get empty stand-ins. Every other request off 127.0.0.1 is refused.

    python bench/circuit_tracer_frontend.py --python /tmp/ct-venv/bin/python FOLDER [--slug SLUG]

Make the environment with ``python -m venv /tmp/ct-venv``, then ``pip install torch==2.13.0``, then
``pip install circuit-tracer==0.5.0 nnsight==0.6.3 "transformers<=4.57"``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LIB = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/"
#: CDN address -> (npm package, file inside it), or None for an empty stand-in script
LIBRARIES = {
    LIB + "d3.js": ("d3@7.9.0", "package/dist/d3.min.js"),
    LIB + "jetpack_2024-07-20.js": ("jetpack", "jetpack.js"),  # built by `jetpack_bundle`
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": ("dagre@0.8.5", "package/dist/dagre.min.js"),
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": ("pako@2.1.0", "package/dist/pako.min.js"),
    LIB + "hotserver-client-ws.js": None,
    LIB + "npy_v0.js": None,
}
STAND_IN = "window.npyjs = window.npyjs || {parse() { throw new Error('npy files are not served here'); }};"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
SERVER = """
import functools, sys
from circuit_tracer.frontend.local_server import DEFAULT_FRONTEND_DIR, CircuitGraphHandler, ReusableTCPServer
handler = functools.partial(CircuitGraphHandler, frontend_dir=DEFAULT_FRONTEND_DIR, data_dir=sys.argv[1])
server = ReusableTCPServer(("127.0.0.1", 0), handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def npm_files(cache: Path) -> dict[str, bytes]:
    """The CDN scripts, from npm packages packed (once) into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    found = {}
    for url, source in LIBRARIES.items():
        if source is None:
            found[url] = STAND_IN.encode()
            continue
        package, member = source
        if package == "jetpack":
            found[url] = jetpack_bundle(cache / "jetpack").read_bytes()
            continue
        name, version = package.rsplit("@", 1)
        archive = cache / f"{name}-{version}.tgz"
        if not archive.exists():
            subprocess.run(["npm", "pack", package, "--silent"], cwd=cache, check=True, capture_output=True,
                           timeout=300)
        with tarfile.open(archive) as tar:
            found[url] = tar.extractfile(member).read()
    return found


#: d3-jetpack 2.3.0 patches d3-selection 1 (its peer dependency): apply its selection methods to d3 7's too
JETPACK_ENTRY = """import * as d3 from "d3";
import * as jetpack from "d3-jetpack";
""" + "".join(f'import {name} from "./node_modules/d3-jetpack/src/{file}.js";\n' for name, file in (
    ("translate", "translate-selection"), ("append", "append"), ("insert", "insert"), ("parent", "parent"),
    ("selectAppend", "selectAppend"), ("tspans", "tspans"), ("appendMany", "appendMany"), ("at", "at"), ("st", "st"))) + """
Object.assign(d3.selection.prototype, {translate, append, insert, parent, selectAppend, tspans, appendMany, at, st,
                                       prop: d3.selection.prototype.property});
Object.assign(d3.transition.prototype, {translate, at, st});
// the newer jetpack the page was written for hands its conventions a drawAxis(svg = c.svg)
const conventions = (options) => {
  const c = jetpack.conventions(options);
  c.drawAxis = (svg) => jetpack.drawAxis({...c, svg: svg || c.svg});
  return c;
};
window.d3 = Object.assign({}, d3, jetpack, {conventions});
"""


def jetpack_bundle(folder: Path) -> Path:
    """d3 7 and d3-jetpack 2.3.0 (npm) bundled by esbuild into one script that sets ``window.d3``."""
    bundle = folder / "jetpack.js"
    if not bundle.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"name": "jetpack-bundle", "version": "1.0.0", "private": true}')
        (folder / "entry.js").write_text(JETPACK_ENTRY)
        subprocess.run(["npm", "install", "--silent", "d3@7.9.0", "d3-jetpack@2.3.0", "esbuild@0.25"], cwd=folder,
                       check=True, capture_output=True, timeout=600)
        subprocess.run(["npx", "esbuild", "entry.js", "--bundle", "--format=iife", "--minify",
                        "--outfile=jetpack.js"], cwd=folder, check=True, capture_output=True, timeout=300)
    return bundle


def count_rendered(python: str, folder: str | Path, *, slug: str | None = None,
                   cache: str | Path = "/tmp/ct-npm", timeout: float = 60.0) -> dict:
    """Serve ``folder`` with circuit-tracer's server (run by ``python``), open its frontend in
    Chromium and count the nodes drawn. Returns ``{"slug", "exported", "rendered", "errors"}``:
    the nodes in the graph file, the node marks on the page, and the page's errors."""
    from playwright.sync_api import sync_playwright

    folder = Path(folder).resolve()
    graphs = json.loads((folder / "graph-metadata.json").read_text())["graphs"]
    slug = slug or graphs[0]["slug"]
    exported = len(json.loads((folder / f"{slug}.json").read_text())["nodes"])
    scripts = npm_files(Path(cache))
    server = subprocess.Popen([python, "-c", SERVER, str(folder)], stdout=subprocess.PIPE, text=True)
    errors: list[str] = []
    try:
        port = int(server.stdout.readline())
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda error: errors.append(str(error)))

            def route(request_route) -> None:
                url = request_route.request.url
                if url in scripts:
                    request_route.fulfill(status=200, content_type="application/javascript", body=scripts[url])
                elif url.startswith(f"http://127.0.0.1:{port}/"):
                    request_route.continue_()
                else:
                    request_route.abort()

            page.route("**/*", route)
            page.goto(f"http://127.0.0.1:{port}/index.html?slug={slug}")
            deadline = time.monotonic() + timeout
            rendered, settled = 0, 0
            while time.monotonic() < deadline and settled < 4:  # the count stays the same for 1 s
                time.sleep(0.25)
                now = page.locator(".link-graph text.node").count()
                settled = settled + 1 if now == rendered and now else 0
                rendered = now
            page.screenshot(path=str(folder / f"{slug}-circuit-tracer.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    return {"slug": slug, "exported": exported, "rendered": rendered, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder written by graph.save(folder, format='circuit-tracer')")
    parser.add_argument("--python", required=True, help="the Python of a venv with circuit-tracer 0.5.0")
    parser.add_argument("--slug", default=None)
    parser.add_argument("--cache", default="/tmp/ct-npm", help="where the npm packages are packed")
    args = parser.parse_args()
    result = count_rendered(args.python, args.folder, slug=args.slug, cache=args.cache)
    print(f"circuit-tracer's frontend drew {result['rendered']} of {result['exported']} exported nodes "
          f"(graph {result['slug']!r}); page errors: {result['errors'] or 'none'}")
    sys.exit(0 if result["rendered"] == result["exported"] and not result["errors"] else 1)


if __name__ == "__main__":
    main()
