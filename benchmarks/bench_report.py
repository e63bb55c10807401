"""Time of the headless report per notebook, CI parameters against defaults, and where it goes.

For each notebook: total wall time of papermill's run; "kernel" = wall time outside cells (kernel start-up
and shutdown, papermill's own work); "imports" = the config and setup cells (importing workbench, torch,
matplotlib in the fresh kernel); "compute" = every other cell. Writes benchmarks/results_report.md (and
.json) atomically and prints the table.

    .venv/bin/python benchmarks/bench_report.py            # CI parameters and defaults
    .venv/bin/python benchmarks/bench_report.py --ci-only  # CI parameters only
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import write_results  # noqa: E402

from workbench import report  # noqa: E402


def split_times(run: report.NotebookRun) -> dict[str, float]:
    nb = nbformat.read(Path(run.out_dir) / run.notebook, as_version=4)
    imports = compute = 0.0
    for cell, sec in zip(nb.cells, run.cell_seconds):
        tags = cell.metadata.get("tags", [])
        if "config" in tags or "parameters" in tags or "injected-parameters" in tags:
            imports += sec
        else:
            compute += sec
    return {"total": run.seconds, "kernel": run.kernel_seconds, "imports": imports, "compute": compute}


def bench(ci: bool, out_root: Path) -> list[dict]:
    rows = []
    for path in report.list_notebooks():
        run = report.run_notebook(path, out_root / ("ci" if ci else "default"), ci=ci)
        rows.append({"notebook": path.stem, "params": "ci" if ci else "default", "status": run.status, **split_times(run)})
        print(f"{path.stem:<30} {rows[-1]['params']:<8} {run.status:<6} {run.seconds:7.1f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| notebook | params | status | total s | kernel s | imports s | compute s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = f"{r['total']:.1f} | {r['kernel']:.1f} | {r['imports']:.1f} | {r['compute']:.1f}"
        lines.append(f"| {r['notebook']} | {r['params']} | {r['status']} | {cells} |")
    for params in sorted({r["params"] for r in rows}):
        total = sum(r["total"] for r in rows if r["params"] == params)
        lines.append(f"| **all** | {params} | | **{total:.1f}** | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ci-only", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(True, Path(tmp))
        if not args.ci_only:
            rows += bench(False, Path(tmp))
    head = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()}, python {sys.version.split()[0]}, "
            f"{len(rows)} runs in {time.time() - t0:.0f} s. Shared 2-core machine: expect noise between runs.")
    print(write_results("results_report", "`workbench report` time per notebook", head, table(rows), rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
