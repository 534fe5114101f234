"""bench/report.py: the README performance table and the charts come from the result files."""

import csv
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.run import COLUMNS  # noqa: E402


def _row(case, provider, mode, metric, p50, backend="eager"):
    row = {column: "" for column in COLUMNS}
    row.update(
        case=case,
        provider=provider,
        backend=backend,
        mode=mode,
        metric=metric,
        p50=p50,
        device="TestGPU",
        timestamp="2026-11-23T10:00:00+00:00",
        git_commit="abc123",
    )
    return row


@pytest.fixture
def results(tmp_path):
    rows = [
        _row("_device/copy", "torch", "copy", "bandwidth", 100.0, backend="copy_"),
        _row("rows/E/8x4", "oodkernels", "full", "time", 2.0, backend="triton"),
        _row("rows/E/8x4", "oodkernels", "full", "bandwidth", 50.0, backend="triton"),
        _row("rows/E/8x4", "reference", "full", "time", 5.0),
        _row("rows/E/8x4", "reference-compiled", "full", "time", 3.0, backend="inductor"),
        _row("rows/E/8x4", "pytorch-ood", "full", "time", 12.0),
        _row("rows/E/8x4", "reference", "fwd", "time", 1.0),  # another mode: not in the table
    ]
    path = tmp_path / "testgpu_2026-11-23.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_table_reports_side_by_side_speedups(results):
    text = report.markdown(report.summarise(report.load(results)))
    assert "Measured on TestGPU on 2026-11-23 (commit abc123)" in text and "Copy bandwidth 100 GB/s" in text
    assert "| rows/E/8x4 | 2 (triton) | 5 | 3 | 12 | 2.50x | 1.50x | 6.00x |" in text


def test_readme_block_is_replaced_and_markers_are_required(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\noutro\n")
    assert report.update_readme(readme, "new table")
    assert readme.read_text() == f"intro\n{report.START}\nnew table\n{report.END}\noutro\n"
    bare = tmp_path / "BARE.md"
    bare.write_text("no markers")
    assert not report.update_readme(bare, "x")


def test_charts_are_written(results):
    pytest.importorskip("matplotlib")
    written = report.plot(report.summarise(report.load(results)), results.with_suffix(""))
    assert [p.name for p in written] == ["testgpu_2026-11-23_speedup.png", "testgpu_2026-11-23_bandwidth.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_committed_readme_table_matches_the_committed_results():
    """The README's table is what bench/report.py generates from bench/results (not typed by hand)."""
    blocks = []
    for path in report.perf_results():
        blocks.append(f"**{path.name}**\n\n" + report.markdown(report.summarise(report.load(path))))
    readme = (ROOT / "README.md").read_text()
    assert f"{report.START}\n" + "\n\n".join(blocks) + f"\n{report.END}" in readme
