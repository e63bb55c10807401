"""The markdown of a committed result file (``results/NAME.json``), the one the README quotes.

Owns: turning a result summary (a dict with ``kind``) into the tables and conclusion the README shows. Must not:
measure, write files (the command line does), or format numbers itself (:func:`workbench.figures.fmt` does).

Kinds: ``compare`` (:func:`workbench.studies.compare.summary`), ``seed_table`` ({"rows": seed_table rows}),
``estimators`` ({"rows": estimator_table rows}), ``mismatch`` ({"rows": studies.steering.mismatch_rows}), ``localiser``
(:func:`workbench.studies.localiser.localiser_vs_ml` with "decoding" and "training").
"""

from __future__ import annotations

from . import MISSING, fmt
from .compare import conclusion, format_table
from .localiser import localiser_markdown
from .seed_note import format_seed_table, seed_conclusion


def estimator_markdown(rows: list[dict]) -> str:
    """:func:`workbench.studies.pipeline.estimator_table` rows as a markdown table: median NMSE [interquartile range]
    per SNR (rows) and estimator (columns)."""
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    snrs = list(dict.fromkeys(r["snr_db"] for r in rows))
    by = {(r["snr_db"], r["estimator"]): r for r in rows}
    lines = ["| SNR dB | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for s in snrs:
        cells = [f"{fmt(by[s, n]['nmse_median'])} [{fmt(by[s, n]['nmse_q25'], 2)}, {fmt(by[s, n]['nmse_q75'], 2)}]" for n in names]
        lines.append(f"| {fmt(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mismatch_markdown(rows: list[dict]) -> str:
    """:func:`workbench.studies.steering.mismatch_rows` as a markdown table: per (phi, r), the bias of the assumed
    model's estimate and sqrt(CRB) under the exact model, and their ratio."""
    lines = ["| φ° | r m | bias φ° | bias r m | √CRB φ° | √CRB r m | bias/√CRB φ | bias/√CRB r |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [fmt(r[k], 3) for k in ("phi_deg", "r_m", "bias_phi_deg", "bias_r_m", "sqrt_crb_phi_deg", "sqrt_crb_r_m", "bias_over_crb_phi",
                                        "bias_over_crb_r")]
        if r.get("range_clipped"):  # the estimate sits at the edge of the field of view: no range bias to report
            cells[3], cells[7] = "at the range limit", MISSING
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """The markdown of a result summary (module docstring), ending in a newline."""
    kind = summary.get("kind", "compare")
    if kind == "compare":
        return f"{format_table(summary['table'])}\n\n{conclusion(summary)}\n"
    if kind == "seed_table":
        return f"{format_seed_table(summary['rows'])}\n\n{seed_conclusion(summary['rows'])}\n"
    if kind == "estimators":
        return f"{estimator_markdown(summary['rows'])}\n"
    if kind == "mismatch":
        return f"{mismatch_markdown(summary['rows'])}\n"
    if kind == "localiser":
        return localiser_markdown(summary)
    raise ValueError(f"result kind {kind!r}: expected compare, seed_table, estimators, mismatch or localiser")
