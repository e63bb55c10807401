"""Figures and text of :mod:`workbench.studies.gradients` (notebook 03) and :mod:`workbench.diagnostics`: the gradient
norm of each eigen backend's term, the Fix 3 verdict in markdown, a gradient report as the command line's text."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import WIDTH_IN, fmt, legend_outside


def gradient_figure(rows: list[dict]) -> Figure:
    """Per backend, the gradient norm of its own term per parameter group (log bars): the gap backends above, the
    subspace backends below, one legend beside them. An exact zero is written a bold "0" at the foot of the axis (no
    bar), a non-finite gradient is a red cross at the top; a gap term whose hinge is inactive in these scenes (gap
    above the margin: gradient exactly zero) is marked "*" and explained in the footnote."""
    kinds = [k for k in ("gap", "subspace") if any(r["kind"] == k for r in rows)] or ["gap"]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(WIDTH_IN, 2.7 * len(kinds) + 0.5), layout="constrained", squeeze=False)
    groups: list[str] = []
    nonfinite = inactive = False
    for ax, kind in zip(axes[:, 0], kinds):
        sub = [r for r in rows if r["kind"] == kind]
        groups = groups or (list(sub[0]["term_grad_norm"]) if sub else [])
        w = 0.8 / max(len(groups), 1)
        finite = [v for r in sub for v in r["term_grad_norm"].values() if math.isfinite(v) and v > 0]
        top = max(finite, default=1.0)
        foot = min(finite, default=1.0) / 30
        for j, g in enumerate(groups):
            for i, r in enumerate(sub):
                v = r["term_grad_norm"].get(g, math.nan)
                x = i + (j - (len(groups) - 1) / 2) * w
                if v == 0.0:
                    ax.text(x, foot, "0", ha="center", va="bottom", fontsize=8, fontweight="bold", color=f"C{j}")
                elif math.isfinite(v):
                    ax.bar(x, v, w, color=f"C{j}")
                else:
                    ax.plot(x, top * 3, "x", color="red", ms=8, mew=2)
                    nonfinite = True
        inactive = inactive or any(r.get("hinge_active") is False for r in sub)
        ax.set_yscale("log")
        ax.set_ylim(foot / 2, top * 10)
        ax.set_xticks(range(len(sub)), [r["backend"] + ("*" if r.get("hinge_active") is False else "") for r in sub], fontsize=8)
        ax.set_xlabel(f"{kind} backend", fontsize=9)
        ax.set_ylabel("‖∇ term‖ (log)", fontsize=9)
        ax.set_title(f"Gradient of the {kind} term through the network", fontsize=9)
    handles = [Patch(color=f"C{j}", label=g) for j, g in enumerate(groups)]
    handles.append(Line2D([], [], color="k", marker="$0$", ls="", label="exactly 0"))
    if nonfinite:
        handles.append(Line2D([], [], color="red", marker="x", ls="", mew=2, label="NaN / inf"))
    legend_outside(axes[0, 0], handles=handles, title="parameter group", title_fontsize=8)
    if inactive:
        fig.supxlabel("* hinge inactive in these scenes (gap above the margin): its gradient is exactly 0", fontsize=8, color="#555")
    fig.suptitle("Gradient norm of each eigen backend's term, per parameter group", fontsize=10)
    return fig


def gradient_verdict(deg: list[dict], fd: list[dict], reports: list[dict], margin: float) -> str:
    """The Fix 3 verdict as this run measured it, in markdown bullets, from the rows of
    :func:`workbench.studies.gradients.degeneracy_check`, ``fd_check`` and ``backend_reports`` (through
    :func:`workbench.studies.gradients.gradient_conclusions`)."""
    from ..studies.gradients import gradient_conclusions

    c = gradient_conclusions(deg, fd, reports)
    ndeg = deg[0]["degenerate"] if deg else 0
    finite_gap = [b for b, ok in c["eigenvalue_only_gap_grad_finite_under_degeneracy"].items() if ok]
    nan_gap = [b for b, ok in c["eigenvalue_only_gap_grad_finite_under_degeneracy"].items() if not ok]
    sub = c["subspace_grad_finite_under_degeneracy"]
    lines = [f"- **The hinge is not a NaN source.** With the hinge made active (margin 1e3) on R = R_ref + C_EPS I, whose "
             f"{ndeg:.0f} smallest eigenvalues coincide to rounding, the gradient is finite for {', '.join(finite_gap)}"
             + (f" and not for {', '.join(nan_gap)}" if nan_gap else "") + ": an eigenvalue-only loss has gradient V diag(g) V^H."]
    bad = [b for b, ok in sub.items() if not ok]
    good = [b for b, ok in sub.items() if ok]
    lines.append(f"- **Eigenvectors are.** Through the same spectrum the subspace term's gradient is non-finite with "
                 f"{', '.join(bad) or 'no backend'} and finite with {', '.join(good)}.")
    prov = sorted({p["op"] for r in reports if r["kind"] == "subspace" for p in r["provenance"] if p["term"] == "subspace"})
    if prov:
        lines.append(f"- In the network the NaN's provenance is {', '.join(prov)}; subspace backends finite there: "
                     f"{', '.join(c['subspace_backends_finite_in_network'])}.")
    inactive = [r["backend"] for r in reports if r["kind"] == "gap" and r["hinge_active"] is False]
    if inactive:
        gap = next((r["gap_eigvalsh"] for r in fd), float("nan"))
        lines.append(f"- In these scenes the hinge is inactive (median gap {fmt(gap)} > margin {margin:g}), so its gradient through the "
                     f"network is exactly 0 for {', '.join(inactive)}: that proves nothing about degeneracy; the active case is above.")
    flip = c["svd_flip"].get("svd_flipped")
    if flip:
        lines.append(f"- `svd_flipped` reads the gap between the smallest eigenvalues ({fmt(flip['gap'])}), so its hinge sits at the margin "
                     f"({fmt(flip['hinge'])}) whatever the prediction; `svd` equals `eigh` here.")
    lines.append(f"- Float64 finite differences agree with autograd (relative error < 1e-4) for {', '.join(c['fd_agrees'])}.")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """A :func:`workbench.diagnostics.gradient_report` as text (``workbench diagnose``): the verdict line with the
    NaN's provenance, a table of the terms (value, weight, gradient norm per group) and the pipeline's norms. A
    non-finite value is written "nan" / "inf": here it is the finding."""
    def num(v, digits: int = 3) -> str:
        return fmt(v, digits, show_nonfinite=True)

    groups = list(report["grad_norm"])
    norms = ", ".join(f"{g} {num(v)}" for g, v in report["grad_norm"].items())
    if report["ok"]:
        lines = [f"gradient finite (norm: {norms})"]
    else:
        lines = [f"gradient NON-FINITE (norm: {norms})"]
    for p in report["provenance"]:
        where = "in the total" if p.get("in_total") else "weight 0: not in the total"
        lines.append(f"  {p['term']} ({where}): created by {p['op']}, reaches {', '.join(p['groups']) or 'no group'}")
    header = f"{'term':<10} {'value':>11} {'weight':>8} " + " ".join(f"{'grad ' + g:>14}" for g in groups)
    lines += ["", header, "-" * len(header)]
    for term, gn in report["term_grad_norm"].items():
        lines.append(f"{term:<10} {num(report['terms'][term], 4):>11} {num(report['weights'].get(term, 0.0)):>8} "
                     + " ".join(f"{num(gn[g]):>14}" for g in groups))
    lines.append(f"{'total':<10} {num(report['loss'], 4):>11}")
    n = report["norms"]
    lines += ["", f"medians: ||R_samp||_F {num(n['R_samp'])}, ||R_pred||_F {num(n['R_pred'])}, ||R_blend||_F {num(n['R_blend'])}, "
                  f"rank(R_blend) {n['rank_R_blend']:.0f}"]
    return "\n".join(lines)
