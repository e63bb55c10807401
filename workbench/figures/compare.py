"""Tables and prose of :mod:`workbench.studies.compare` (notebooks 04 and 05, ``workbench compare``, the README's
results table): the training rows' conclusion, the results table as markdown and what it says.

Owns: the markdown made from :func:`workbench.studies.compare.training_rows` and a
:func:`workbench.studies.compare.compare` result. Must not: train, evaluate or compute a number the rows do not hold.
"""

from __future__ import annotations

import math

from . import MISSING, fmt


def training_conclusion(rows: list[dict]) -> str:
    """Markdown bullets from :func:`workbench.studies.compare.training_rows`: who passed all four checks, who skipped steps (and where the
    NaN came from), and the ranking by validation NMSE."""
    checks = ("loss finite and in range", "gradients finite", "training loss decreasing", "weights changing")
    passed = [r["preset"] for r in rows if all(r[c] for c in checks)]
    failed = {r["preset"]: [c for c in checks if not r[c]] for r in rows if r["preset"] not in passed}
    lines = [f"- All four checks of the seed note passed: {', '.join(passed) if passed else 'no run'}."]
    lines += [f"- {name} failed: {', '.join(cs)}." for name, cs in failed.items()]
    for r in rows:
        if r["skipped steps"]:
            lines.append(f"- {r['preset']}: {r['skipped steps']} steps skipped for a non-finite gradient (from {r['NaN source']}).")
    ranked = sorted((r for r in rows if r["final val NMSE"] is not None), key=lambda r: r["final val NMSE"])
    if ranked:
        lines.append("- Validation NMSE after training, best first: " + ", ".join(f"{r['preset']} {fmt(r['final val NMSE'])}" for r in ranked)
                     + " (1 is what R_pred = 0 scores; a scaled identity scores about 1 - N/‖R_true‖² in trace-N units).")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """The results rows as a markdown table (RMSE / sqrt(CRB) as phi / theta / r per SNR)."""
    snrs = next((list(r["rmse_over_crb"]) for r in rows if r["rmse_over_crb"]), [])
    head = ["predictor", "val NMSE", *[f"RMSE/√CRB φ/θ/r @ {s} dB" for s in snrs], "F1", "K acc.", "skipped", "train s", "oracle knowledge"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        loc = [("/".join(fmt(r["rmse_over_crb"][s][c], 2) for c in ("phi", "theta", "r")) if r["rmse_over_crb"] else MISSING) for s in snrs]
        lines.append("| " + " | ".join([r["row"], fmt(r["nmse"]), *loc, fmt(r["f1"], 2), fmt(r["k_accuracy"], 2), fmt(r["skipped"]),
                                        fmt(r["train_seconds"], 3), r["oracle"]]) + " |")
    return "\n".join(lines)


def conclusion(result: dict) -> str:
    """Markdown bullets from this run's numbers: which entries skipped steps, the best trained NMSE against the best
    baseline, and how far MUSIC on each R_pred is from the bound at the highest SNR run."""
    rows = result["table"]
    trained = [r for r in rows if r["kind"] == "trained"]
    base = [r for r in rows if r["kind"] == "baseline" and r["nmse"] is not None]
    lines = []
    skipped = [f"{r['row'].split(':')[0]} ({r['skipped']} steps)" for r in trained if r["skipped"]]
    lines.append(f"- Steps skipped for a non-finite gradient: {', '.join(skipped) if skipped else 'none, under every entry'}.")
    if trained and base:
        best_t = min(trained, key=lambda r: r["nmse"] if r["nmse"] is not None else math.inf)
        best_b = min(base, key=lambda r: r["nmse"])
        verdict = "beats" if best_t["nmse"] is not None and best_t["nmse"] < best_b["nmse"] else "does not beat"
        lines.append(f"- Best trained validation NMSE: {best_t['row']} {fmt(best_t['nmse'])}; best baseline: {best_b['row']} "
                     f"{fmt(best_b['nmse'])} (constants fitted on the training scenes). The network {verdict} it.")
        for name, v in result.get("verdicts", {}).items():
            bands = [b for b in v["by_snr"] if b is not None]
            if bands:
                lines.append(f"- {name}: below every baseline in {sum(bands)} of {len(bands)} SNR bands "
                             f"(smallest margin {fmt(v['margin'])} NMSE).")
    snrs = next((list(r["rmse_over_crb"]) for r in rows if r["rmse_over_crb"]), [])
    if snrs:
        s = snrs[-1]
        parts = [f"{r['row']} {fmt(r['rmse_over_crb'][s]['phi'], 2)}" for r in rows if r["rmse_over_crb"]]
        lines.append(f"- MUSIC φ RMSE over sqrt(CRB) at {s} dB (1 = the bound; true K): " + "; ".join(parts) + ".")
        found = [f"{r['row']} {fmt(r['detected_over_crb'][s]['phi'], 2)} / {fmt(r['detected_over_crb'][s]['theta'], 2)}"
                 for r in rows if r["detected_over_crb"] and r["kind"] != "reference"]
        if found:
            lines.append("- The same over the detected sources only (φ / θ, the spread of the sources found): " + "; ".join(found) + ".")
    return "\n".join(lines)
