"""The seed note's Progress table as markdown, and what it says (notebook 01, ``workbench seed-table``).

Owns: the markdown made from :func:`workbench.studies.seed_note.seed_table` rows. Must not: measure (the rows
come from the study). A measured NaN or inf (a gradient norm, a loss) is written as such: it is the finding.
"""

from __future__ import annotations

from ..studies.seed_note import SEED_NOTE_ROWS
from . import MISSING, fmt

_MEASURED = {"show_nonfinite": True}  # fmt's keyword for a measured norm, loss or gradient: NaN / inf are the finding

def format_seed_table(rows: list[dict]) -> str:
    """Markdown table of :func:`workbench.studies.seed_note.seed_table` rows (medians, with the interquartile range in brackets)."""
    def q(d):
        return f"{fmt(d['median'], 4, **_MEASURED)} [{fmt(d['q25'], **_MEASURED)}, {fmt(d['q75'], **_MEASURED)}]"

    lines = [
        "| preset | raw ‖R_samp‖_F | ‖R_samp‖_F | ‖R_blend‖_F | rank(R_blend) | oracle NMSE | loss | grad backbone | grad head | ok | NaN from |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        prov = "; ".join(f"{p['term']}:{p['op']}" for p in r["provenance"]) or MISSING
        lines.append(
            f"| {r['preset']} | {q(r['R_samp_raw_fro'])} | {q(r['R_samp_fro'])} | {q(r['R_blend_fro'])} | "
            f"{r['R_blend_rank']['median']:.0f} | {q(r['oracle_nmse'])} | {fmt(r['loss'], 4, **_MEASURED)} | "
            f"{fmt(r['grad_norm']['backbone'], **_MEASURED)} | {fmt(r['grad_norm']['head'], **_MEASURED)} | {r['ok']} | {prov} |"
        )
    return "\n".join(lines)


def seed_conclusion(seed_rows: list[dict]) -> str:
    """Markdown bullets: the seed note's claims beside what this run measured."""
    by = {r["preset"]: r for r in seed_rows}
    lines = []
    for name, quoted in SEED_NOTE_ROWS.items():
        r = by.get(name)
        if r is None:
            continue
        lines.append(f"- **{name}**: the note had ‖R_samp‖_F {quoted['R_samp_fro']:g} and ‖R_blend‖_F {quoted['R_blend_fro']:g} with "
                     f"{quoted['grad']} gradients; measured {fmt(r['R_samp_fro']['median'], **_MEASURED)} and "
                     f"{fmt(r['R_blend_fro']['median'], **_MEASURED)} with "
                     f"{'finite' if r['ok'] else 'NaN'} gradients.")
    floors = ", ".join(f"{r['preset']} {fmt(r['oracle_nmse']['median'], **_MEASURED)}" for r in seed_rows)
    lines.append(f"- An exact prediction scores NMSE {floors}: a non-zero floor wherever C_EPS loads only the prediction side.")
    nan = [r["preset"] for r in seed_rows if not r["ok"]]
    lines.append(f"- Gradients non-finite in: {', '.join(nan) if nan else 'none of these presets'}.")
    return "\n".join(lines)
