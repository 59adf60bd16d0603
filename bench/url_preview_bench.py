"""The cost of a URL preview, this project beside a real Synapse in one run (issue 21).

One run serves pages from an origin of its own on 127.0.0.1 (an HTTP server in this
process: each page ``--page-kib`` of HTML with Open Graph tags, a title, paragraphs of
text and an ``og:image``, a PNG of its own), starts this project as ``make run`` does
(``--project-dir``, a fresh data directory, previews on with 127.0.0.1 allowed, no rate)
and a real Synapse (``scripts/synapse`` with ``SYNAPSE_URL_PREVIEW=1``: previews on, the
usual blacklist, 127.0.0.1 whitelisted), and measures both with the same requests:

1. **Fresh previews**: ``--pages`` URLs neither server has seen, ``--clients`` at a time,
   ``GET /_matrix/client/v1/media/preview_url?url=...``: each a page fetch, an image
   fetch and storing it (Synapse also makes its thumbnails). Server CPU per preview
   (user+system of the whole process tree, psutil), latency p50/p99, what came back
   (the title and an ``mxc://`` image checked), and how often the origin was asked for
   each page and image (once each is right).
2. **Cached previews**: ``--cached`` requests for URLs already previewed: CPU per answer
   from the cache.

The phases are interleaved (``--repeats`` rounds, each server's phase back to back, the
order reversed on odd rounds, new URLs every round), so a change in the machine's load
hits both alike. Every request has a timeout; failures are counted, never a hang.

    .venv/bin/python bench/url_preview_bench.py --label current --json F
    .venv/bin/python bench/url_preview_bench.py --pages 20 --cached 50 --repeats 1   # smoke

Needs psutil and aiohttp (``bench/requirements.txt``), Pillow (the project's), and
``SYNAPSE_URL_PREVIEW=1 scripts/synapse install`` done (Synapse with its url-preview
extra; or ``SYNAPSE_VENV`` naming such a venv). psutil reads CPU time in ticks of 10 ms
per process: runs of a few previews are coarse, the defaults are not.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import ROOT, machine_info, markdown_table
from request_plane_bench import (
    ProjectServer,
    SynapseServer,
    log,
    ms,
    percentile,
    raise_nofile,
    self_cpu,
)

PREVIEW = "/_matrix/client/v1/media/preview_url"
REQUEST_TIMEOUT = 60.0


# --------------------------------------------------------------------------- the origin


def png(seed: int, size: int = 96) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256))
    for x in range(0, size, 8):
        image.putpixel((x, (seed + x) % size), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def page(path: str, kib: int) -> bytes:
    paragraph = (
        "<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
        "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam.</p>\n"
    )
    head = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Title of {path}</title>"
        f"<meta property='og:title' content='Title of {path}'>"
        f"<meta property='og:description' content='What {path} is about'>"
        f"<meta property='og:type' content='article'>"
        f"<meta property='og:image' content='/img{path}.png'>"
        "<link rel='stylesheet' href='/style.css'><script>var analytics = 1;</script>"
        "</head><body><nav>Home | News | About</nav><article>"
    )
    body = paragraph * max(1, (kib * 1024 - len(head)) // len(paragraph))
    return (head + body + "</article><footer>(c)</footer></body></html>").encode()


class Origin:
    """Pages and their images, made on first request; counts what was asked."""

    def __init__(self, kib: int) -> None:
        self.kib = kib
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with origin._lock:
                    origin.hits[path] += 1
                if path.startswith("/img/") and path.endswith(".png"):
                    body, kind = png(zlib.crc32(path.encode()) % 100_000), "image/png"
                elif path.startswith("/page/"):
                    body, kind = page(path, origin.kib), "text/html; charset=utf-8"
                else:
                    body, kind = b"not here", "text/plain"
                    self.send_response(404)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Origin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- servers


class PreviewingSynapse(SynapseServer):
    def env(self) -> dict[str, str]:
        return {**super().env(), "SYNAPSE_URL_PREVIEW": "1"}

    def version(self) -> str:
        import subprocess

        venv = Path(os.environ.get("SYNAPSE_VENV", ROOT / ".venv-synapse"))
        out = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import synapse; print(synapse.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip().split(" ")[0]


def project(project_dir: Path, data_dir: Path) -> ProjectServer:
    server = ProjectServer(project_dir, data_dir, None)
    server.extra_env = {
        "MSC3870_URL_PREVIEW_ENABLED": "1",
        "MSC3870_URL_PREVIEW_IP_RANGE_ALLOWLIST": "127.0.0.1/32",
        "MSC3870_URL_PREVIEW_RATE": "0",
    }
    return server


# --------------------------------------------------------------------------- phases


@dataclass
class Phase:
    requests: int = 0
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    wall: float = 0.0

    def report(self) -> dict[str, Any]:
        ok = self.outcomes.get("ok", 0)
        return {
            "requests": self.requests,
            "outcomes": dict(self.outcomes),
            "wall_s": round(self.wall, 3),
            "server_cpu_s": round(self.server_cpu, 4),
            "server_cpu_ms_per_preview": round(self.server_cpu / ok * 1000, 3) if ok else None,
            "client_cpu_s": round(self.client_cpu, 3),
            "p50_ms": ms(percentile(self.latencies, 50)),
            "p99_ms": ms(percentile(self.latencies, 99)),
        }


async def one_preview(
    session: aiohttp.ClientSession, base: str, token: str, url: str, phase: Phase
) -> None:
    started = time.monotonic()
    try:
        async with session.get(
            f"{base}{PREVIEW}?url={quote(url, safe='')}",
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            raw = await resp.read()
        outcome = "ok"
        if resp.status != 200:
            outcome = f"status {resp.status}"
        else:
            og = json.loads(raw)
            if not str(og.get("og:title", "")).startswith("Title of"):
                outcome = "no title"
            elif not str(og.get("og:image", "")).startswith("mxc://"):
                outcome = "no image"
    except (TimeoutError, aiohttp.ClientError) as exc:
        outcome = type(exc).__name__
    phase.latencies.append(time.monotonic() - started)
    phase.outcomes[outcome] += 1


async def run_phase(base: str, token: str, urls: Sequence[str], clients: int, tree: Any) -> Phase:
    phase = Phase(requests=len(urls))
    queue: asyncio.Queue[str] = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            while not queue.empty():
                await one_preview(session, base, token, queue.get_nowait(), phase)

        cpu_before, mine_before, started = tree.cpu_seconds(), self_cpu(), time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        phase.wall = time.monotonic() - started
        phase.server_cpu = tree.cpu_seconds() - cpu_before
        phase.client_cpu = self_cpu() - mine_before
    return phase


def pooled(phases: list[Phase]) -> dict[str, Any]:
    total = Phase()
    for phase in phases:
        total.requests += phase.requests
        total.latencies += phase.latencies
        total.outcomes.update(phase.outcomes)
        total.server_cpu += phase.server_cpu
        total.client_cpu += phase.client_cpu
        total.wall += phase.wall
    return {**total.report(), "rounds": [p.report() for p in phases]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    scratch = Path(tempfile.mkdtemp(prefix="url-preview-bench-"))
    ours = project(Path(args.project_dir).resolve(), scratch / "mediarepo")
    synapse = PreviewingSynapse(scratch / "synapse")
    servers: dict[str, Any] = {"mediarepo": ours, "synapse": synapse}
    report: dict[str, Any] = {
        "bench": "url_preview",
        "label": args.label,
        "machine": machine_info(),
        "args": vars(args),
        "servers": {},
    }
    with Origin(args.page_kib) as origin:
        try:
            for name, server in servers.items():
                log(f"starting {name}")
                server.start()
            tokens = {
                "mediarepo": ours.mint_tokens(["@bench:localhost"])[0],
                "synapse": synapse.mint_tokens(["@bench:localhost"])[0],
            }
            report["synapse_version"] = synapse.version()
            fresh: dict[str, list[Phase]] = {name: [] for name in servers}
            cached: dict[str, list[Phase]] = {name: [] for name in servers}
            for round_ in range(args.repeats):
                order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
                for name in order:
                    server = servers[name]
                    urls = [f"{origin.url}/page/{name}/r{round_}/{n}" for n in range(args.pages)]
                    log(f"round {round_ + 1}: {name}, {len(urls)} fresh previews")
                    fresh[name].append(
                        asyncio.run(
                            run_phase(server.url, tokens[name], urls, args.clients, server.tree)
                        )
                    )
                    again = [urls[n % len(urls)] for n in range(args.cached)]
                    log(f"round {round_ + 1}: {name}, {len(again)} cached previews")
                    cached[name].append(
                        asyncio.run(
                            run_phase(server.url, tokens[name], again, args.clients, server.tree)
                        )
                    )
            for name in servers:
                pages = [p for p in origin.hits if p.startswith(f"/page/{name}/")]
                images = [p for p in origin.hits if p.startswith(f"/img/page/{name}/")]
                report["servers"][name] = {
                    "fresh": pooled(fresh[name]),
                    "cached": pooled(cached[name]),
                    "origin_pages_asked": len(pages),
                    "origin_page_requests": sum(origin.hits[p] for p in pages),
                    "origin_images_asked": len(images),
                    "origin_image_requests": sum(origin.hits[p] for p in images),
                }
        finally:
            for name, server in servers.items():
                log(f"stopping {name}")
                try:
                    server.stop()
                except Exception as exc:  # a stop that fails must not hide the results
                    log(f"stopping {name} failed: {exc}")
    return report


def summary(report: dict[str, Any]) -> str:
    rows = []
    for name, server in report["servers"].items():
        for phase in ("fresh", "cached"):
            found = server[phase]
            rows.append(
                [
                    name,
                    phase,
                    found["requests"],
                    ", ".join(f"{k}: {v}" for k, v in sorted(found["outcomes"].items())),
                    found["server_cpu_ms_per_preview"],
                    found["p50_ms"],
                    found["p99_ms"],
                ]
            )
    table = markdown_table(
        ["server", "previews", "n", "outcomes", "server CPU ms/preview", "p50 ms", "p99 ms"],
        rows,
    )
    origin = "\n".join(
        f"- {name}: {s['origin_page_requests']} page requests for {s['origin_pages_asked']} "
        f"pages, {s['origin_image_requests']} image requests for {s['origin_images_asked']} "
        "images"
        for name, s in report["servers"].items()
    )
    return f"Synapse {report.get('synapse_version', '?')}\n\n{table}\n\nThe origin saw:\n{origin}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", default=str(ROOT))
    parser.add_argument("--label", default="current")
    parser.add_argument("--pages", type=int, default=200, help="fresh URLs per round")
    parser.add_argument("--cached", type=int, default=1000, help="cached previews per round")
    parser.add_argument("--clients", type=int, default=8, help="requests at a time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--page-kib", type=int, default=40)
    parser.add_argument("--json", help="write the report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print(summary(report))
    path = Path(args.json) if args.json else ROOT / f"bench/results/url-preview-{args.label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
