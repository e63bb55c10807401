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


def ci(d: dict | None, digits: int = 3) -> str:
    """A value with its interval, "v [lo, hi]" (``d`` = {"value", "lo", "hi"}), or the missing mark."""
    if not d or d.get("value") is None:
        return MISSING
    if d.get("lo") is None or d.get("hi") is None:
        return fmt(d["value"], digits)
    return f"{fmt(d['value'], digits)} [{fmt(d['lo'], 2)}, {fmt(d['hi'], 2)}]"


def format_table(rows: list[dict]) -> str:
    """The results rows as two markdown tables: the test NMSE (with its interval), skipped steps, training time and
    each row's oracle knowledge; then, per SNR, the per-source normalised error err/sqrt(CRB_k) and the RMSE with the
    true K given, and the miss rate, false-alarm rate and K accuracy with the row's own count (each "value [95 % interval]")."""
    head = ["predictor", "test NMSE", "skipped", "train s", "oracle knowledge"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append("| " + " | ".join([r["row"], ci(r["nmse"]), fmt(r["skipped"]), fmt(r["train_seconds"], 3), r["oracle"] or MISSING]) + " |")
    head = ["predictor", "SNR dB", "err/√CRB φ (true K)", "err/√CRB θ (true K)", "err/√CRB r (true K)", "RMSE φ° / θ° / r m (true K)",
            "miss (own K)", "false alarm (own K)", "K acc. (own K)"]
    lines += ["", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        for snr, m in (r["localisation"] or {}).items():
            t, o = m["true_k"], m["own_k"]
            rmse = " / ".join(fmt(t[k]["value"], 2) for k in ("rmse_phi_deg", "rmse_theta_deg", "rmse_r_m"))
            lines.append("| " + " | ".join([r["row"], snr, ci(t["nerr_phi"], 2), ci(t["nerr_theta"], 2), ci(t["nerr_r"], 2), rmse,
                                            ci(o["miss_rate"], 2), ci(o["false_alarm_rate"], 2), ci(o["k_accuracy"], 2)]) + " |")
    return "\n".join(lines)


def conclusion(result: dict) -> str:
    """Markdown bullets from this run's numbers (test split): which entries skipped steps; the best trained NMSE
    against the best baseline, with intervals and whether they overlap; at the highest SNR, the row closest to the
    bound per source and every row's miss rate with its own count."""
    rows = result["table"]
    trained = [r for r in rows if r["kind"] == "trained"]
    base = [r for r in rows if r["kind"] == "baseline" and r["nmse"]]
    lines = []
    skipped = [f"{r['row'].split(':')[0]} ({r['skipped']} steps)" for r in trained if r["skipped"]]
    lines.append(f"- Steps skipped for a non-finite gradient: {', '.join(skipped) if skipped else 'none, under every entry'}.")

    def value(r):
        return r["nmse"]["value"] if r["nmse"] and r["nmse"]["value"] is not None else math.inf

    if trained and base:
        best_t, best_b = min(trained, key=value), min(base, key=value)
        if best_t["nmse"] and best_t["nmse"]["hi"] is not None and best_b["nmse"]["lo"] is not None and best_t["nmse"]["hi"] < best_b["nmse"]["lo"]:
            verdict = "beats it: the intervals do not overlap"
        elif value(best_t) < value(best_b):
            verdict = "is lower, but the intervals overlap: not a claim"
        else:
            verdict = "does not beat it"
        fitted = "constants" + (f" and its MDL penalty (x{best_b['penalty_scale']:g} Rissanen's; its localisation counts at the default)"
                                if best_b.get("penalty_scale") is not None else "")
        lines.append(f"- Best trained test NMSE: {best_t['row']} {ci(best_t['nmse'])}; best baseline: {best_b['row']} {ci(best_b['nmse'])} "
                     f"({fitted} fitted on the training scenes). The network {verdict}.")
    snrs = next((list(r["localisation"]) for r in rows if r["localisation"]), [])
    if snrs:
        s = snrs[-1]
        loc = {r["row"]: r["localisation"][s] for r in rows if r["localisation"] and r["kind"] != "reference"}
        if loc:
            best = min(loc, key=lambda n: loc[n]["true_k"]["nerr_phi"]["value"] if loc[n]["true_k"]["nerr_phi"]["value"] is not None else math.inf)
            t = loc[best]["true_k"]
            lines.append(f"- Closest to the bound at {s} dB with the true K given (per-source error over sqrt(CRB_k), 1 = the bound): "
                         f"{best}, φ {ci(t['nerr_phi'], 2)}, θ {ci(t['nerr_theta'], 2)}, r {ci(t['nerr_r'], 2)}.")
            lines.append(f"- Missed sources at {s} dB with each row's own count (gate {fmt(result['localisation']['gate'])} sqrt(CRB_k), "
                         "floored at one grid step): " + "; ".join(f"{n} {ci(m['own_k']['miss_rate'], 2)}" for n, m in loc.items()) + ".")
    sc = result.get("scenes", {})
    lines.append(f"- Scenes: the test split of seed {sc.get('test_seed')} ({sc.get('n_test')} for the NMSE, {sc.get('n_per_snr')} per SNR "
                 f"for localisation); training seed {sc.get('seed')}. {ORACLE_NOTE_TEXT}")
    return "\n".join(lines)


ORACLE_NOTE_TEXT = ("Every row knows the exact channel H and the RIS codes; the true-K columns give every row the true K.")
