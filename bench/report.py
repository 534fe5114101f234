"""Performance report from committed benchmark results: a README table and PNG charts.

    python bench/report.py                      # every bench/results/*.csv -> README table + charts
    python bench/report.py --results FILE.csv   # one file
    python bench/report.py --no-readme          # charts only

The table lists, per results file (one device and date), the full training step (forward +
backward) of every case: the median time of each provider and oodkernels' speed-up over the
others, all measured side by side in one run. The charts (``<results file stem>_speedup.png`` and
``<stem>_bandwidth.png`` next to the CSV) show the speed-up of oodkernels per case and provider, and
the achieved bandwidth of each provider against the measured copy bandwidth (the roofline).
"""

from __future__ import annotations

import argparse
import collections
import csv
import math
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
START = "<!-- perf-table:start -->"
END = "<!-- perf-table:end -->"
PROVIDERS = ("oodkernels", "reference", "reference-compiled", "pytorch-ood")
MODE = "full"


def load(path: Path) -> list[dict]:
    """The rows of one results CSV."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def summarise(rows: list[dict], mode: str = MODE) -> dict:
    """``{"device", "date", "commit", "copy_gbps", "cases": {case: {provider: {"p50", "backend", "gbps"}}}}``.

    Repeated measurements of a case and provider (appended runs) keep the latest row.
    """
    cases: dict = collections.OrderedDict()
    meta = {"device": "", "date": "", "commit": "", "copy_gbps": math.nan}
    for row in rows:
        if row["case"] == "_device/copy":
            meta["copy_gbps"] = _number(row["p50"])
            meta["device"] = row["device"]
            meta["date"] = row["timestamp"][:10]
            meta["commit"] = row["git_commit"]
            continue
        if row["mode"] != mode:
            continue
        entry = cases.setdefault(row["case"], {}).setdefault(row["provider"], {})
        if row["metric"] == "time":
            entry["p50"] = _number(row["p50"])
            entry["backend"] = row["backend"]
        elif row["metric"] == "bandwidth":
            entry["gbps"] = _number(row["p50"])
        meta["device"] = meta["device"] or row["device"]
        meta["date"] = meta["date"] or row["timestamp"][:10]
        meta["commit"] = meta["commit"] or row["git_commit"]
    return {**meta, "cases": cases}


def _ms(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3g}"


def _ratio(a, b) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or a <= 0:
        return "n/a"
    return f"{b / a:.2f}x"


def markdown(summary: dict) -> str:
    """A markdown table of one summarised results file."""
    lines = [
        f"Measured on {summary['device']} on {summary['date']} (commit {summary['commit']}), "
        f"full step (forward + backward), median ms; every provider in one run, side by side. "
        f"Copy bandwidth {_ms(summary['copy_gbps'])} GB/s.",
        "",
        "| case | oodkernels (backend) | reference | reference compiled | pytorch-ood 0.4.0 "
        "| vs reference | vs compiled | vs pytorch-ood |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, providers in summary["cases"].items():
        ours = providers.get("oodkernels", {})
        t = {p: providers.get(p, {}).get("p50") for p in PROVIDERS}
        lines.append(
            f"| {case} | {_ms(t['oodkernels'])} ({ours.get('backend', '?')}) | {_ms(t['reference'])} "
            f"| {_ms(t['reference-compiled'])} | {_ms(t['pytorch-ood'])} | {_ratio(t['oodkernels'], t['reference'])} "
            f"| {_ratio(t['oodkernels'], t['reference-compiled'])} | {_ratio(t['oodkernels'], t['pytorch-ood'])} |"
        )
    return "\n".join(lines)


def update_readme(readme: Path, text: str, start: str = START, end: str = END) -> bool:
    """Replace the block between the ``start`` and ``end`` markers (default: the perf table's) of ``readme``;
    False when the markers are missing."""
    content = readme.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        return False
    readme.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content))
    return True


def perf_results(folder: Path = RESULTS) -> list[Path]:
    """The benchmark result files of ``folder`` (bench/run.py's), without the GPU audit's (``audit-*.csv``)."""
    return [p for p in sorted(folder.glob("*.csv")) if not p.name.startswith("audit-")]


def _bar_chart(summary: dict, series: dict, ylabel: str, path: Path, hline=None) -> Path:
    """Grouped bars: one group per case, one bar per entry of ``series`` (label -> values per case)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(summary["cases"])
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(cases)), 5))
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        offsets = [i + (k - (len(series) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(offsets, values, width, label=label)
    if hline is not None:
        value, style, label = hline
        ax.axhline(value, label=label, **style)
    ax.set_xticks(range(len(cases)), [c.replace("/", "\n", 1) for c in cases], rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(f"full step, {summary['device']}, {summary['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(summary: dict, stem: Path) -> list[Path]:
    """Write ``<stem>_speedup.png`` and ``<stem>_bandwidth.png``; returns the paths (needs matplotlib)."""
    cases = summary["cases"]

    def p50(case, provider):
        return cases[case].get(provider, {}).get("p50", math.nan)

    speedups = {}
    for provider in (p for p in PROVIDERS if p != "oodkernels"):
        ours = [p50(c, "oodkernels") for c in cases]
        speedups[provider] = [
            p50(c, provider) / o if o and not math.isnan(o) else math.nan for c, o in zip(cases, ours)
        ]
    bandwidth = {p: [cases[c].get(p, {}).get("gbps", math.nan) for c in cases] for p in PROVIDERS}
    roofline = None
    if not math.isnan(summary["copy_gbps"]):
        roofline = (summary["copy_gbps"], {"color": "red", "linestyle": "--"}, "copy bandwidth (roofline)")
    return [
        _bar_chart(
            summary,
            speedups,
            "speed-up of oodkernels (x)",
            stem.with_name(stem.name + "_speedup.png"),
            (1.0, {"color": "black", "linewidth": 0.8}, None),
        ),
        _bar_chart(
            summary,
            bandwidth,
            "achieved GB/s (bytes model of KERNEL_GUIDE §1.5)",
            stem.with_name(stem.name + "_bandwidth.png"),
            roofline,
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="*", default=None, help="result CSVs (default: bench/results/*.csv)")
    parser.add_argument("--readme", default=str(README), help="README whose perf-table block is replaced")
    parser.add_argument("--no-readme", action="store_true", help="do not touch the README")
    parser.add_argument("--no-plots", action="store_true", help="do not write charts")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.results] if args.results else perf_results()
    if not paths:
        print("no results file found")
        return 1
    blocks = []
    for path in paths:
        summary = summarise(load(path))
        blocks.append(f"**{path.name}**\n\n" + markdown(summary))
        if not args.no_plots:
            try:
                written = plot(summary, path.with_suffix(""))
            except ImportError:
                print("matplotlib is not installed: no charts (pip install matplotlib)")
            else:
                print("\n".join(f"wrote {p}" for p in written))
    text = "\n\n".join(blocks)
    if not args.no_readme:
        if not update_readme(Path(args.readme), text):
            print(f"{args.readme}: no {START} ... {END} block; table not written")
            return 1
        print(f"updated {args.readme}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
