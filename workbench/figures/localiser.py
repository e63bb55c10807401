"""Figures and tables of :mod:`workbench.studies.localiser` (notebook 05, README "The learned localiser"): the learned
localiser against the ML fit per SNR (:func:`localiser_table`; given the true K, :func:`true_k_table`; misses by each
source's SNR, :func:`miss_by_snr_table`; the count's frontier, :func:`frontier_table`, :func:`frontier_conclusion`,
:func:`frontier_figure`), and one scene's matched-filter spectrum and heatmap
with the localiser's detections, the ML fit's sources and the truth (:func:`localiser_scene_figure`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import WIDTH_IN, fmt, legend_outside, markdown_table

TABLE_STATS = (("miss_rate", "miss"), ("false_alarm_rate", "false alarm"), ("k_accuracy", "K acc."), ("nerr_hit_phi", "nerr φ"),
               ("nerr_hit_theta", "nerr θ"), ("nerr_hit_r", "nerr r"))
TRUE_K_STATS = (("nerr_phi", "nerr φ"), ("nerr_theta", "nerr θ"), ("rmse_phi_deg", "RMSE φ (deg)"), ("rmse_theta_deg", "RMSE θ (deg)"),
                ("miss_rate", "miss"))


def _ci(d: dict) -> str:
    return f"{fmt(d['value'])} [{fmt(d['lo'])}, {fmt(d['hi'])}]"


def localiser_table(res: dict) -> list[dict]:
    """Rows for :func:`workbench.figures.markdown_table` of a :func:`workbench.studies.localiser.localiser_vs_ml` result,
    each estimator counting for itself (oracle "none"): per SNR and estimator the detection, count and per-source
    normalised errors (nerr: sqrt(mean err^2 / CRB_k) over the detections) with 95 % intervals, the NMSE of the
    covariance and the seconds per scene."""
    return [{"SNR dB": fmt(r["snr_db"]), "estimator": r["estimator"], **{label: _ci(r["stats"][k]) for k, label in TABLE_STATS},
             "NMSE": _ci(r["nmse"]), "s / scene": fmt(r["seconds_per_scene"])} for r in res["rows"] if r.get("oracle", "none") == "none"]


def true_k_table(res: dict) -> list[dict]:
    """Rows of the estimators given the true K (oracle "true K"), then of the likelihood scored from the true locations
    (oracle "true locations"; none when the result has no such rows): the error over every Hungarian pair, as peers
    report RMSE with K given, normalised per source (nerr, sqrt(mean err^2 / CRB_k)) and in degrees, and the miss rate
    under the gate, with 95 % intervals."""
    return [{"SNR dB": fmt(r["snr_db"]), "estimator": r["estimator"], **{label: _ci(r["stats"][k]) for k, label in TRUE_K_STATS}}
            for r in res["rows"] if r.get("oracle") in ("true K", "true locations")]


def search_table(res: dict) -> list[dict]:
    """Rows of each ML fit's misses given the true K split by cause (``search`` of the result; none when absent): the
    scenes with a miss, and among them the search failures (the fit from the true locations is more likely)."""
    return [{"SNR dB": fmt(m["snr_db"]), "estimator": m["estimator"], "scenes": m["scenes"], "with a miss": m["scenes_with_miss"],
             "of which search failures": m["search_failures"], "search failures, all scenes": m["search_failures_all"]}
            for m in res.get("search", [])]


def _bin_label(b: dict) -> str:
    lo, hi = b["lo"], b["hi"]
    return f"< {fmt(hi)} dB" if lo is None else f">= {fmt(lo)} dB" if hi is None else f"{fmt(lo)}-{fmt(hi)} dB"


def miss_by_snr_table(res: dict) -> list[dict]:
    """Rows of the miss rate by each true source's per-snapshot array SNR (``miss_by_snr`` of the result; none when
    absent): one row per SNR and estimator, one column per bin, "miss [95 % interval] (n sources)"."""
    return [{"SNR dB": fmt(m["snr_db"]), "estimator": m["estimator"],
             **{_bin_label(b): f"{_ci(b['miss'])} ({b['n']})" for b in m["bins"]}} for m in res.get("miss_by_snr", [])]


# the goals for the learned localiser against the ML fit on the same scenes (README, "The learned localiser"): the
# strongest ML row (with RELAX, where the result has one) for detection, accuracy and NMSE; the fastest (plain) for speed
STRONGEST_ML = ("ML fit + RELAX", "ML fit")  # the first the result has is the reference for detection and accuracy
GOALS = {"miss_rate": 0.5, "false_alarm_rate": 0.5}  # at most this share of the ML fit's rate
GOAL_K_ACCURACY = 0.95
GOAL_NERR = 1.3  # sqrt(mean err^2 / CRB_k) over the detections (matched inside the gate), in phi and theta
GOAL_TRUE_K_NERR = 2.0  # the same over every pair with the true K given (the peers' RMSE), in phi and theta
GOAL_SPEEDUP = 20.0  # the ML fit's seconds per scene over the localiser's


FRONTIER_TABLE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)  # the frontier table's columns (the figure draws every scale)


def frontier_table(res: dict) -> list[dict]:
    """Rows of the count's frontier (``frontier`` of the result; none when absent): per SNR and ML fit (and the fit
    from the true sources, oracle), one column per MDL penalty scale of :data:`FRONTIER_TABLE_SCALES` (and the
    entry's, marked with a star), "miss / false alarm" there."""
    out = {}
    for f in res.get("frontier", []):
        if f["scale"] not in FRONTIER_TABLE_SCALES and not f["entry"]:
            continue
        row = out.setdefault((f["snr_db"], f["estimator"]), {"SNR dB": fmt(f["snr_db"]), "estimator": f["estimator"],
                                                              "oracle": f["oracle"]})
        label = f"x{fmt(f['scale'])}" + ("*" if f["entry"] else "")
        row[label] = f"{fmt(f['miss_rate']['value'])} / {fmt(f['false_alarm_rate']['value'])}"
    return list(out.values())


def _frontier_goal(at: list[dict]) -> tuple[str, float, float] | None:
    """The detection goal on one SNR's frontier points ``at``: (the strongest ML fit of :data:`STRONGEST_ML` there, the
    most misses, the most false alarms: :data:`GOALS` times its rates at its own penalty); None without such a fit."""
    name = next((n for n in STRONGEST_ML if any(f["estimator"] == n and f["entry"] for f in at)), None)
    if name is None:
        return None
    ref = next(f for f in at if f["estimator"] == name and f["entry"])
    return name, GOALS["miss_rate"] * ref["miss_rate"]["value"], GOALS["false_alarm_rate"] * ref["false_alarm_rate"]["value"]


def frontier_conclusion(res: dict) -> str:
    """One sentence per SNR, computed from the result's ``frontier``: whether any MDL penalty of the count over the
    perfect search (the fit from the true sources, oracle) meets the detection goals (:data:`GOALS` of the strongest ML
    fit's rates at the entry's penalty) and :data:`GOAL_K_ACCURACY`, and each estimator's misses against the fewest of
    the perfect search at a false-alarm rate no higher than its own (how far it is from a perfect search, as nerr is
    from the bound); empty without a frontier. A goal that no penalty meets on the perfect search is beyond the MDL
    count itself, whatever proposes the sources."""
    front = res.get("frontier", [])
    if not front:
        return ""
    lines = []
    for snr in res["snr_db"]:
        at = [f for f in front if f["snr_db"] == snr]
        goal = _frontier_goal(at)
        if goal is None:  # frontier_scales without the fits' own penalty
            lines.append(f"- **{fmt(snr)} dB**: no ML fit at its own penalty in the frontier: no goal to check.")
            continue
        name, goal_m, goal_f = goal
        truth = [f for f in at if f["oracle"] == "true locations"]
        both = [f for f in truth if f["miss_rate"]["value"] <= goal_m and f["false_alarm_rate"]["value"] <= goal_f]
        within_fa = [f for f in truth if f["false_alarm_rate"]["value"] <= goal_f]
        best_m = min(within_fa, key=lambda f: f["miss_rate"]["value"]) if within_fa else None
        best_k = max(truth, key=lambda f: f["k_accuracy"]["value"])
        head = (f"- **{fmt(snr)} dB**: the goal is at most {fmt(goal_m)} missed and {fmt(goal_f)} false alarms ({fmt(GOALS['miss_rate'])}x "
                f"the {name}'s at x{fmt(res['mdl_scale'])}). ")
        if both:
            f = min(both, key=lambda f: f["scale"])
            head += (f"The perfect search (oracle) meets both at x{fmt(f['scale'])}: {fmt(f['miss_rate']['value'])} / "
                     f"{fmt(f['false_alarm_rate']['value'])}, so a better search could; ")
        elif best_m is not None:
            m = best_m["miss_rate"]
            decided = ("its interval excludes the goal: no MDL penalty reaches it even on a perfect search" if m["lo"] > goal_m
                       else "its interval reaches the goal: not decided at this many scenes")
            head += (f"The perfect search (oracle) meets the two at no penalty: where its false alarms are within the goal "
                     f"(x{fmt(best_m['scale'])}, the least such) it misses {fmt(m['value'])} [{fmt(m['lo'])}, {fmt(m['hi'])}], "
                     f"{decided}; ")
        else:
            head += "The perfect search (oracle) keeps more false alarms than the goal at every penalty; "
        ok = best_k["k_accuracy"]["value"] >= GOAL_K_ACCURACY
        head += (f"its best K accuracy is {fmt(best_k['k_accuracy']['value'])} at x{fmt(best_k['scale'])} "
                 f"({'reaches' if ok else 'below'} the goal of {fmt(GOAL_K_ACCURACY)}).")
        gaps = []
        for r in res["rows"]:
            if r["snr_db"] != snr or r.get("oracle", "none") != "none":
                continue
            fa, miss = r["stats"]["false_alarm_rate"]["value"], r["stats"]["miss_rate"]["value"]
            floor = min((f["miss_rate"]["value"] for f in truth if f["false_alarm_rate"]["value"] <= fa), default=None)
            if floor is not None:
                gaps.append(f"{r['estimator']} {fmt(miss)} against {fmt(floor)} ({fmt(miss / floor) if floor > 0 else 'inf'}x)")
        if gaps:
            head += (" Misses against the perfect search's fewest at no more false alarms (the excess over a perfect "
                     "search): " + "; ".join(gaps) + ".")
        lines.append(head)
    return "\n".join(lines)


def localiser_conclusion(res: dict) -> str:
    """One sentence per SNR, computed from a :func:`workbench.studies.localiser.localiser_vs_ml` result: each goal
    (:data:`GOALS`, :data:`GOAL_K_ACCURACY`, :data:`GOAL_NERR`, :data:`GOAL_SPEEDUP`) met or missed, with the measured
    ratio or value against the ML fit on the same scenes: the strongest of :data:`STRONGEST_ML` the result has for
    detection, count, accuracy and NMSE, the plain ML fit (the fastest) for speed."""
    by = {(r["snr_db"], r["estimator"], r.get("oracle", "none")): r for r in res["rows"]}
    lines = []
    for snr in res["snr_db"]:
        name = next(n for n in STRONGEST_ML if (snr, n, "none") in by)
        loc, ml, fast = by[snr, "localiser", "none"], by[snr, name, "none"], by[snr, "ML fit", "none"]
        parts = []
        for key, label in (("miss_rate", "miss rate"), ("false_alarm_rate", "false-alarm rate")):
            a, b = loc["stats"][key]["value"], ml["stats"][key]["value"]
            ratio = a / b if b > 0 else float("inf") if a > 0 else 0.0
            parts.append(f"{label} {fmt(a)} = {fmt(ratio)}x the {name}'s {fmt(b)} "
                         f"({'met' if ratio <= GOALS[key] else 'missed'}: goal <= {fmt(GOALS[key])}x)")
        k = loc["stats"]["k_accuracy"]["value"]
        parts.append(f"K accuracy {fmt(k)} ({'met' if k >= GOAL_K_ACCURACY else 'missed'}: goal >= {fmt(GOAL_K_ACCURACY)}; "
                     f"{name} {fmt(ml['stats']['k_accuracy']['value'])})")
        nerr = max(loc["stats"]["nerr_hit_phi"]["value"], loc["stats"]["nerr_hit_theta"]["value"])
        nerr_ml = max(ml["stats"]["nerr_hit_phi"]["value"], ml["stats"]["nerr_hit_theta"]["value"])
        parts.append(f"nerr over the detections {fmt(nerr)} in the worse of φ, θ ({'met' if nerr <= GOAL_NERR else 'missed'}: "
                     f"goal <= {fmt(GOAL_NERR)}; {name} {fmt(nerr_ml)})")
        if (snr, "localiser", "true K") in by:
            tk = by[snr, "localiser", "true K"]["stats"]
            tk_ml = by[snr, name, "true K"]["stats"]
            v = max(tk["nerr_phi"]["value"], tk["nerr_theta"]["value"])
            parts.append(f"with the true K, nerr over every pair {fmt(v)} in the worse of φ, θ "
                         f"({'met' if v <= GOAL_TRUE_K_NERR else 'missed'}: goal <= {fmt(GOAL_TRUE_K_NERR)}; "
                         f"{name} {fmt(max(tk_ml['nerr_phi']['value'], tk_ml['nerr_theta']['value']))})")
        nm_loc, nm_ml = loc["nmse"]["value"], ml["nmse"]["value"]
        parts.append(f"NMSE {fmt(nm_loc)} against the {name}'s {fmt(nm_ml)} ({'below' if nm_loc < nm_ml else 'not below'})")
        speed = fast["seconds_per_scene"] / loc["seconds_per_scene"]
        parts.append(f"{fmt(speed)}x fewer seconds per scene than the ML fit ({'met' if speed >= GOAL_SPEEDUP else 'missed'}: "
                     f"goal >= {fmt(GOAL_SPEEDUP)}x)")
        lines.append(f"- **{fmt(snr)} dB**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def localiser_markdown(summary: dict) -> str:
    """The result file of ``workbench localiser`` (kind ``localiser``) as markdown: what was trained and scored, the
    table (:func:`localiser_table`) and the goals (:func:`localiser_conclusion`); ends in a newline."""
    t, d = summary["training"], summary["decoding"]
    head = (f"Trained on {t['n_train']} train-split scenes ({t['system']}), {t['epochs']} epochs, batch {t['batch_size']}, "
            f"lr {fmt(t['lr'])}, width {t['width']}, {t['layers']} blocks ({fmt(t['train_seconds'])} s of training). "
            f"Decoding: " + ", ".join(f"{k} {fmt(v)}" for k, v in sorted(d.items())) + ". "
            f"Scored on {summary['n_per_snr']} {summary['split']}-split scenes per SNR (seed {summary['seed']}) on {summary['device']}; "
            "no headline row knows K, the noise variance or R_true.")
    parts = [head, markdown_table(localiser_table(summary))]
    if true_k_table(summary):
        parts += ["Given the true K (oracle knowledge; each ML fit's nested fit of that count from the same run), and the "
                  "likelihood scored from the true locations (oracle: what a perfect search reaches):",
                  markdown_table(true_k_table(summary))]
    if search_table(summary):
        parts += ["Each ML fit's scenes with a miss given the true K, and among them the search failures (the likelihood "
                  f"scored from the true locations is higher by more than {fmt(summary['search_margin'])} nat: a better search, "
                  "not a better model, would find those sources):", markdown_table(search_table(summary))]
    if miss_by_snr_table(summary):
        parts += ["Miss rate by each true source's per-snapshot array SNR (p_k mean_l ||G_l a_k||² / σ², from the true powers "
                  "and noise variance: for the analysis only), each estimator counting for itself:",
                  markdown_table(miss_by_snr_table(summary))]
    if frontier_table(summary):
        parts += ["The count's frontier: miss / false-alarm rate of each ML fit with its count re-chosen at other MDL penalties "
                  "(multiples of Rissanen's log(L)/2 per real parameter; * the fits' own), and of the nested fits started from "
                  "the true sources, strongest first (oracle \"true locations\": a perfect search, counted by the same likelihood):",
                  markdown_table(frontier_table(summary)), frontier_conclusion(summary)]
    return "\n\n".join([*parts, localiser_conclusion(summary)]) + "\n"


def frontier_figure(res: dict) -> Figure:
    """One panel per SNR: miss rate against false-alarm rate of each ML fit as its MDL penalty moves (the result's
    ``frontier``; the fits' own penalty ringed), the perfect search's (oracle) dashed, the localiser's own point, and
    the goal's corner (:data:`GOALS` of the strongest fit's rates) shaded; the axes span the operating points (false
    alarms up to 4x the largest at an entry penalty or the localiser's, and the localiser's misses)."""
    snrs = res["snr_db"]
    fig, axes = plt.subplots(1, len(snrs), figsize=(WIDTH_IN, 3.0), layout="constrained", squeeze=False)
    rows = {(r["snr_db"], r["estimator"]): r for r in res["rows"] if r.get("oracle", "none") == "none"}
    for ax, snr in zip(axes[0], snrs):
        at = [f for f in res.get("frontier", []) if f["snr_db"] == snr]
        for name in dict.fromkeys(f["estimator"] for f in at):
            pts = [f for f in at if f["estimator"] == name]
            xs, ys = [f["false_alarm_rate"]["value"] for f in pts], [f["miss_rate"]["value"] for f in pts]
            line, = ax.plot(xs, ys, marker=".", ls="--" if pts[0]["oracle"] != "none" else "-",
                            label=name + (" (oracle)" if pts[0]["oracle"] != "none" else ""))
            for f in pts:
                if f["entry"]:
                    ax.plot(f["false_alarm_rate"]["value"], f["miss_rate"]["value"], "o", mfc="none", mec=line.get_color(), ms=9)
        if (snr, "localiser") in rows:
            st = rows[snr, "localiser"]["stats"]
            ax.plot(st["false_alarm_rate"]["value"], st["miss_rate"]["value"], "*", color="k", ms=11, label="localiser")
        goal = _frontier_goal(at)
        if goal is not None:
            ax.fill_between([0, goal[2]], 0, goal[1], color="tab:green", alpha=0.25, lw=0, label="goal")
        # the region around the operating points: 4x the largest false-alarm rate at an entry penalty or the localiser's
        own = [f["false_alarm_rate"]["value"] for f in at if f["entry"]]
        if (snr, "localiser") in rows:
            own.append(rows[snr, "localiser"]["stats"]["false_alarm_rate"]["value"])
        x_hi = 4 * max(own, default=0.0) or None
        inside = [f["miss_rate"]["value"] for f in at if x_hi is None or f["false_alarm_rate"]["value"] <= x_hi]
        if (snr, "localiser") in rows:
            inside.append(rows[snr, "localiser"]["stats"]["miss_rate"]["value"])
        ax.set(xlabel="false-alarm rate", ylabel="miss rate", title=f"{fmt(snr)} dB", xlim=(0, x_hi),
               ylim=(0, 1.15 * max(inside, default=0.0) or None))
        ax.grid(alpha=0.3)
    legend_outside(axes[0, -1])
    fig.suptitle("The count's frontier: misses against false alarms as the MDL penalty moves", fontsize=10)
    return fig


def localiser_scene_figure(view: dict) -> Figure:
    """Two panels over (phi, theta), each the maximum over range: the matched-filter spectrum the network reads (dB) and
    its heatmap (probability), with the true sources (white x), the localiser's (red o) and the ML fit's (cyan +)."""
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH_IN, 2.6), layout="constrained")
    ext = (view["phi_deg"][0], view["phi_deg"][-1], view["theta_deg"][0], view["theta_deg"][-1])
    for ax, key, title, kw in ((axes[0], "spectrum_db", "matched filter (dB, max over r)", {"vmin": -20, "vmax": 0}),
                               (axes[1], "heat", "localiser heatmap (max over r)", {"vmin": 0, "vmax": 1})):
        im = ax.imshow(view[key], origin="lower", extent=ext, aspect="auto", cmap="viridis", **kw)
        fig.colorbar(im, ax=ax, shrink=0.8)
        for pts, style in ((view["true"], dict(marker="x", color="white", ms=8, mew=2)),
                           (view["localiser"], dict(marker="o", mfc="none", mec="red", ms=9, mew=1.5)),
                           (view["ml"], dict(marker="+", color="cyan", ms=9, mew=1.5))):
            ax.plot([p["phi_deg"] for p in pts], [p["theta_deg"] for p in pts], ls="none", **style)
        ax.set_title(title, fontsize=9)
        ax.set(xlabel="φ (deg)", ylabel="θ (deg)")
    legend_outside(axes[1], handles=[Line2D([], [], ls="none", marker="x", color="k", label=f"true (K = {view['K']})"),
                                     Line2D([], [], ls="none", marker="o", mfc="none", mec="red", label=f"localiser (K = {view['K_localiser']})"),
                                     Line2D([], [], ls="none", marker="+", color="c", label=f"ML fit (K = {view['K_ml']})")])
    fig.suptitle(f"One scene at {fmt(view['snr_db'])} dB", fontsize=10)
    return fig
