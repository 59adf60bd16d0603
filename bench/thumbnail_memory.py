"""Peak RSS of thumbnail renders of one huge, tiny-on-the-wire image (issue 8, item 1).

A 32-megapixel image that compresses to about 100 KB passes both source limits
(``THUMBNAIL_MAX_SOURCE_BYTES``, ``THUMBNAIL_MAX_PIXELS``). This script asks for N
thumbnails of it at once, from N threads of one fresh process (as N requests on one
worker), through ``msc3870.thumbnails.thumbnail`` on the local-disk store, and reports
the process's peak RSS (``VmHWM``) before and after.

    .venv/bin/python bench/thumbnail_memory.py                     # RGB PNG, 4 sizes
    .venv/bin/python bench/thumbnail_memory.py --mode RGBA --format PNG
    .venv/bin/python bench/thumbnail_memory.py --format JPEG --same-size
    git show d8c6202:msc3870/thumbnails.py > /tmp/old_thumbnails.py   # before issue 8.1
    .venv/bin/python bench/thumbnail_memory.py --implementation /tmp/old_thumbnails.py

Each run is a fresh child process (peak RSS never goes down); ``--repeat`` runs several.
Nothing is left behind: the data directory is a temporary one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The four sizes of the report: two crops and two scales (Synapse's defaults).
SIZES = [(32, 32, "crop"), (96, 96, "crop"), (320, 240, "scale"), (800, 600, "scale")]


def make_image(mode: str, fmt: str, width: int, height: int) -> bytes:
    """Mostly one colour with a few shapes: huge decoded, tiny encoded."""
    from PIL import Image, ImageDraw

    colour: Any = {"RGB": (10, 120, 200), "RGBA": (10, 120, 200, 128), "L": 90, "P": 3}[mode]
    image = Image.new(mode, (width, height), colour)
    draw = ImageDraw.Draw(image)
    for i in range(8):
        box = (i * width // 9, i * height // 9, (i + 1) * width // 9, (i + 1) * height // 9)
        draw.ellipse(box, fill=colour if mode in ("L", "P") else (200, 30, 30)[: len(mode)])
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def max_rss_mib() -> float:
    """Peak RSS of this process so far. VmHWM belongs to the address space, which exec
    replaces; ru_maxrss would carry the parent's peak (it built the image) across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace, data_dir: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process, with its data in ``data_dir``."""
    os.environ["MEDIAREPO_DATA_DIR"] = data_dir
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mediarepo.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from msc3870 import thumbnails
    from msc3870.conf import app_settings

    if args.implementation:  # another version of msc3870/thumbnails.py, e.g. an older one
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "msc3870._bench_thumbnails", args.implementation
        )
        assert spec and spec.loader
        thumbnails = importlib.util.module_from_spec(spec)  # type: ignore[assignment]
        sys.modules[spec.name] = thumbnails
        spec.loader.exec_module(thumbnails)
    from msc3870.models import Media
    from msc3870.stores import get_store

    source = Path(args.source).read_bytes()
    content_type = "image/png" if args.format == "PNG" else "image/jpeg"
    key = "media/bench-source"
    get_store().write_stream(
        key, io.BytesIO(source), max_size=len(source), content_type=content_type
    )
    media = Media(
        media_id="benchsource",
        content_type=content_type,
        size=len(source),
        storage_key=key,
    )
    sizes = [SIZES[-1]] * args.threads if args.same_size else (SIZES * 4)[: args.threads]
    results: list[str] = [""] * len(sizes)
    barrier = threading.Barrier(len(sizes))

    def run(i: int, size: tuple[int, int, str]) -> None:
        barrier.wait()  # all requests arrive together
        try:
            thumb = thumbnails.thumbnail(media, *size)
            results[i] = f"ok {thumb.size} B"
        except Exception as exc:  # reported, not raised
            results[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(sizes)]
    before = max_rss_mib()
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    after = max_rss_mib()
    settings_used = {
        name: getattr(app_settings, name)
        for name in (
            "THUMBNAIL_MAX_PIXELS",
            "THUMBNAIL_MAX_DECODED_BYTES",
            "THUMBNAIL_CONCURRENT_RENDERS",
            "THUMBNAIL_RENDER_WAIT_SECONDS",
        )
        if hasattr(type(app_settings), name)
    }
    return {
        "source_bytes": len(source),
        "sizes": [f"{w}x{h}-{m}" for w, h, m in sizes],
        "results": results,
        "peak_rss_before_mib": round(before, 1),
        "peak_rss_after_mib": round(after, 1),
        "peak_rss_added_mib": round(after - before, 1),
        "seconds": round(elapsed, 2),
        "implementation": args.implementation or "msc3870/thumbnails.py",
        "settings": settings_used,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="RGB", choices=["RGB", "RGBA", "L", "P"])
    parser.add_argument("--format", default="PNG", choices=["PNG", "JPEG"])
    parser.add_argument("--width", type=int, default=8000)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--same-size", action="store_true", help="all threads ask one size")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--implementation", help="a thumbnails.py to measure instead")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        data_dir = tempfile.mkdtemp(prefix="mediarepo-thumbbench-")
        try:
            print(json.dumps(child(args, data_dir)))
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="thumbbench-") as tmp:
        source = Path(tmp) / "source"
        source.write_bytes(make_image(args.mode, args.format, args.width, args.height))
        runs = []
        for _ in range(args.repeat):
            command = [sys.executable, __file__, "--child", "--source", str(source)]
            command += ["--mode", args.mode, "--format", args.format]
            command += ["--threads", str(args.threads)]
            command += ["--same-size"] if args.same_size else []
            if args.implementation:
                command += ["--implementation", str(Path(args.implementation).resolve())]
            out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(json.dumps(run))
        summary = {
            "image": f"{args.width}x{args.height} {args.mode} {args.format}",
            "threads": args.threads,
            "same_size": args.same_size,
            "runs": runs,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
