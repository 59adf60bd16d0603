"""Time to downloadable after an upload to URL, from saved ``upload_bench.py --compare``
runs: per size, the medians of when a recipient waiting since /create got its first byte,
beside the same run's Synapse and the bare presigned PUT, and how long it waited after
the uploader's PUT ended. One run per ``--run LABEL=PATH`` (a before and an after, say).

    .venv/bin/python bench/time_to_downloadable.py \\
        --run before=bench/results/a.json --run after=bench/results/b.json \\
        --plot docs/time-to-downloadable.png

``--screening-log`` reads the server's own split of that wait from a kept log directory
(``upload_bench.py --keep-logs``): the ``move_ms`` and ``duration_ms`` of each screening
line, in the order of the uploads.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import markdown_table

SYNAPSE = "Synapse"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def this_server(run: dict[str, Any], policy: str | None = None) -> str:
    """The run's subject of this server: its first, or the one of ``policy`` (a run of
    several ``--policies``)."""
    return next(
        k
        for k, v in run.items()
        if isinstance(v, dict) and k != SYNAPSE and (policy is None or f"({policy}," in k)
    )


def got_the_media(subject: dict[str, Any]) -> bool:
    """The waiting recipient got the media, not an error (a 504 once the download wait's
    cap passed: its "first byte" is the error's). Runs saved before the status was kept
    say it through ``verified`` (both downloads of the run matched)."""
    if "first_byte_status" in subject:
        return bool(subject["first_byte_status"] == 200)
    return bool(subject["verified"])


def by_size(results: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Medians per size: bare PUT, this server's and Synapse's answer and first byte. A
    recipient that got no media counts with when the row was decided instead (the media
    was downloadable then, and not before: a lower bound), flagged by ``timed_out``."""
    out: dict[int, dict[str, float]] = {}
    for size in sorted({r["size_mib"] for r in results["runs"]}):
        runs = [r for r in results["runs"] if r["size_mib"] == size]
        ours = this_server(runs[0], results.get("_policy"))

        def first(subject: dict[str, Any]) -> float:
            if got_the_media(subject):
                return float(subject["first_byte_s"])
            return float(subject["decided_with_recipient_s"])

        out[size] = {
            "bare": median([r["bare_put_s"] for r in runs]),
            "put": median([r[ours]["put_done_s"] for r in runs]),
            "answered": median([r[ours]["answered_s"] for r in runs]),
            "first": median([first(r[ours]) for r in runs]),
            "after_put": median([first(r[ours]) - r[ours]["put_done_s"] for r in runs]),
            "synapse_put": median([r[SYNAPSE]["put_done_s"] for r in runs]),
            "synapse_first": median([first(r[SYNAPSE]) for r in runs]),
            "timed_out": sum(not got_the_media(r[ours]) for r in runs),
            "n": len(runs),
        }
    return out


FOOTNOTE = (
    "\n\n* the recipient got a 504 at the download wait's cap (60 s) in that many repeats:"
    " those count with when the row was decided (downloadable then, not before)."
)


def table(labelled: list[tuple[str, dict[str, Any]]]) -> str:
    rows = []
    for label, results in labelled:
        for size, m in by_size(results).items():
            rows.append(
                [
                    f"{size} MiB",
                    f"{label} ({results['machine']['git_head']})",
                    m["n"],
                    f"{m['bare']:.2f}",
                    f"{m['put']:.2f}",
                    f"{m['first']:.2f}"
                    + (f" ({m['timed_out']:.0f} decided *)" if m["timed_out"] else ""),
                    f"{m['after_put']:.2f}",
                    f"{m['synapse_first']:.2f}",
                    f"{m['first'] / m['synapse_first']:.2f}",
                    f"{m['bare'] / m['synapse_first']:.2f}",
                ]
            )
    return markdown_table(
        [
            "size",
            "run",
            "repeats",
            "bare presigned PUT s",
            "this server: PUT done s",
            "this server: first byte s",
            "this server: first byte after the PUT s",
            "Synapse: first byte s",
            "first byte vs Synapse's",
            "bare PUT vs Synapse's first byte",
        ],
        rows,
    )


def plot(labelled: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """Left: seconds from the start of the upload until a waiting recipient's first byte,
    beside the bare presigned PUT. Right: the part of it after this server's PUT ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole_ax, after_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for number, (label, results) in enumerate(labelled):
        medians = by_size(results)
        sizes = list(medians)
        head = results["machine"]["git_head"]
        style = ["o-", "s--", "^-."][number % 3]
        whole_ax.plot(
            sizes, [medians[s]["first"] for s in sizes], style, label=f"this server, {label}"
        )
        whole_ax.plot(
            sizes,
            [medians[s]["synapse_first"] for s in sizes],
            style,
            color="tab:red",
            alpha=0.6,
            label=f"Synapse ({label} run)",
        )
        whole_ax.plot(
            sizes,
            [medians[s]["bare"] for s in sizes],
            ":",
            color="black",
            alpha=0.4 + 0.3 * number,
            label=f"bare presigned PUT ({label} run)",
        )
        after_ax.plot(
            sizes,
            [medians[s]["after_put"] for s in sizes],
            style,
            label=f"this server, {label} ({head})",
        )
    for ax in (whole_ax, after_ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("upload size (MiB)")
        ax.legend(fontsize=7)
    whole_ax.set_ylabel("seconds from the start of the upload")
    whole_ax.set_title("First byte to a recipient waiting since /create")
    after_ax.set_ylabel("seconds after the uploader's PUT ended")
    after_ax.set_title("Wait after the PUT (the move, the checks, the wake-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def screening_lines(directory: Path) -> list[tuple[float, float]]:
    """(move_ms, duration_ms) of every screening line under ``directory``, in file order."""
    found = []
    for path in sorted(directory.rglob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "msc3870.steps: screening" not in line:
                continue
            move = re.search(r"\bmove_ms=([\d.]+)", line)
            total = re.search(r"\bduration_ms=([\d.]+)", line)
            if total:
                # No move_ms: the version was checked where it was uploaded (the
                # "versioned" policy), nothing moved before the verdict.
                found.append((float(move.group(1)) if move else 0.0, float(total.group(1))))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], help="LABEL=PATH of a --json")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--screening-log", type=Path, help="a kept log directory")
    parser.add_argument("--screening-run", help="the LABEL of the run that kept that log")
    args = parser.parse_args()
    labelled = []
    for spec in args.run:
        # LABEL=PATH, or LABEL=PATH#POLICY for one policy of a run of several.
        label, _, path = spec.partition("=")
        path, _, policy = path.partition("#")
        results = json.loads(Path(path).read_text())
        results["_policy"] = policy or None
        labelled.append((label, results))
    if labelled:
        text = table(labelled)
        print(text + (FOOTNOTE if "decided *" in text else ""))
    if args.plot:
        plot(labelled, args.plot)
    if args.screening_log:
        # In upload order: the warm-up, then each run's upload without and with a
        # recipient (upload_bench.compare_main), sizes from --screening-run.
        sizes = ["4 MiB (warm-up)"]
        kept = [r for label, r in labelled if label == args.screening_run]
        if kept:
            for run in kept[0]["runs"]:
                sizes += [f"{run['size_mib']} MiB", f"{run['size_mib']} MiB, recipient waiting"]
        lines = screening_lines(args.screening_log)
        sizes += ["?"] * (len(lines) - len(sizes))
        rows = [
            [size, f"{move:.0f}", f"{total:.0f}", f"{move / total:.0%}"]
            for size, (move, total) in zip(sizes, lines, strict=False)
        ]
        print()
        print(markdown_table(["upload", "move_ms", "screening duration_ms", "move share"], rows))


if __name__ == "__main__":
    main()
