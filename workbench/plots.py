"""What the notebooks show: small "compute the data for this view" functions and the figure builders.

Each view has a pure compute function (tensors in, plain dicts/tensors out, no plotting) and a figure
builder (matplotlib for the static PNG files, plotly where interaction helps). The notebooks call these
once headless; the panels in :mod:`workbench.ui` call the very same functions when a control moves.

Matrices are the pipeline's (DESIGN.md section 3): R_true (trace-normalised to N, "R_ref"), R_samp (as
the fixes make it), R_pred = A A^H of an untrained, seeded network, R_blend. Eigenvalues are real,
descending, in the matrices' units (trace N scale, dimensionless).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from .config import ExperimentConfig, preset
from .covariance import spectrum_stats
from .io import atomic_write, atomic_write_json, atomic_write_text
from .physics import SceneBatch, simulate

MATRICES = ("R_true", "R_samp", "R_pred", "R_blend")
COLOURS = {"R_true": "#1b9e77", "R_samp": "#d95f02", "R_pred": "#7570b3", "R_blend": "#e7298a", "R_samp_raw": "#a6761d"}


# ---------------------------------------------------------------------------------------------
# Saving (atomic: temp file in the same folder, then os.replace)
def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> str:
    """Write a matplotlib figure as PNG atomically and close it. Returns the path as a string."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return str(path)


def save_html(fig, path: str | os.PathLike) -> str:
    """Write a plotly figure as a standalone HTML page; plotly.js is written once beside it (offline)."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    js = os.path.join(folder, "plotly.min.js")
    if not os.path.exists(js):
        from plotly.offline import get_plotlyjs

        atomic_write_text(js, get_plotlyjs())
    atomic_write_text(path, fig.to_html(include_plotlyjs="directory", full_html=True))
    return path


def save_metrics(out_dir: str | os.PathLike, metrics: dict, name: str = "metrics.json") -> str:
    """metrics.json under ``out_dir`` (created), written atomically. Returns its path."""
    path = os.path.join(os.fspath(out_dir), name)
    atomic_write_json(path, metrics)
    return path


# ---------------------------------------------------------------------------------------------
# The pipeline's matrices for a batch
@dataclass
class PipelineMatrices:
    """[n,N,N] complex64 matrices of one batch under one config, plus the raw (unnormalised) R_samp and K [n]."""

    R_true: torch.Tensor
    R_samp_raw: torch.Tensor
    R_samp: torch.Tensor
    R_pred: torch.Tensor
    R_blend: torch.Tensor
    K: torch.Tensor

    def get(self, name: str) -> torch.Tensor:
        return getattr(self, name)


def scene_batch(cfg: ExperimentConfig, n_scenes: int, seed: int) -> SceneBatch:
    """The simulated scenes every view of a notebook shares (CPU, seeded)."""
    return simulate(cfg.system, n_scenes, seed=seed)


@torch.no_grad()
def pipeline_matrices(cfg: ExperimentConfig, batch: SceneBatch, model: torch.nn.Module | None = None, seed: int = 0) -> PipelineMatrices:
    """Run the covariance pipeline of ``cfg`` on ``batch`` with ``model`` (default: an untrained model
    built from ``cfg.model`` with ``seed``). R_true is returned trace-normalised to N (the loss's R_ref)."""
    from .covariance import rsamp_for
    from .losses import covariances
    from .model import build_model

    device = batch.y.device
    model = build_model(cfg.system, cfg.model, device, seed=seed) if model is None else model
    R_samp = rsamp_for(batch, cfg.fixes, cfg.system)
    raw = R_samp if not cfg.fixes.rsamp_normalise else rsamp_for(batch, cfg.fixes.replace(rsamp_normalise=False), cfg.system)
    out = model(batch.y, batch.H, batch.codes, R_samp=R_samp)
    cov = covariances(out, batch, R_samp, cfg)
    return PipelineMatrices(R_true=cov.R_ref, R_samp_raw=raw, R_samp=cov.R_samp, R_pred=cov.R_pred, R_blend=cov.R_blend, K=batch.K)


def _median(x: torch.Tensor) -> float:
    """Interpolated median (as numpy and diagnostics.seed_table take it), inf-safe: the mean of the two
    middle values when their number is even (torch.quantile's lerp gives nan for inf, inf)."""
    v = x.double().flatten().sort().values
    n = v.numel()
    return float(v[n // 2]) if n % 2 else float((v[n // 2 - 1] + v[n // 2]) / 2)


def matrix_summary(R: torch.Tensor, K: torch.Tensor | None = None) -> dict[str, float]:
    """Medians over the batch of ||R||_F, Re tr R, numerical rank, condition number (and the K-gap)."""
    s = spectrum_stats(R, K)
    out = {"fro": _median(s["fro"]), "trace": _median(s["trace"]), "rank": _median(s["rank"].double()), "cond": _median(s["cond"])}
    if "gap" in s:
        out["gap"] = _median(s["gap"])
    return out


# ---------------------------------------------------------------------------------------------
# 01: norms, traces and ranks under each preset
def normalisation_rows(presets: Sequence[str], n_scenes: int, seed: int = 0, overrides: dict | None = None) -> list[dict]:
    """For each preset (with dotted ``overrides``): median ||.||_F, trace, rank and condition number of
    R_samp (raw and as used), R_pred and R_blend over the same ``n_scenes`` scenes and the same untrained
    model. One dict per preset: {"preset", "config": fixes dict, "R_samp_raw": {...}, "R_samp", "R_pred", "R_blend"}."""
    rows = []
    for name in presets:
        cfg = preset(name, **(overrides or {}))
        rows.append({"preset": name, "config": cfg.fixes.to_dict(), **pipeline_summary(cfg, scene_batch(cfg, n_scenes, seed), seed=seed)})
    return rows


def pipeline_summary(cfg: ExperimentConfig, batch: SceneBatch, seed: int = 0) -> dict[str, dict]:
    """{matrix name: :func:`matrix_summary`} for R_samp_raw, R_samp, R_pred, R_blend under ``cfg``."""
    mats = pipeline_matrices(cfg, batch, seed=seed)
    return {name: matrix_summary(mats.get(name), mats.K) for name in ("R_samp_raw", "R_samp", "R_pred", "R_blend")}


def norms_figure(rows: list[dict]) -> Figure:
    """Grouped bars, log scale: median ||R||_F of each matrix per preset, with rank(R_blend) written on top."""
    names = ("R_samp_raw", "R_samp", "R_pred", "R_blend")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 3.8))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [max(r[name]["fro"], 1e-30) for r in rows], width, label=name, color=COLOURS[name])
    for i, r in enumerate(rows):
        ax.annotate(f"rank {r['R_blend']['rank']:.0f}", (i + 1.5 * width, r["R_blend"]["fro"]), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [r["preset"] for r in rows], rotation=15)
    ax.set_ylabel("median Frobenius norm")
    ax.set_title("Fix 1 / Fix 2: norms of the pipeline's matrices")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def seed_comparison(seed_rows: list[dict]) -> list[dict]:
    """The seed note's Progress table beside the measured one: one row per (metric, preset) the note
    quotes, {"metric", "preset", "seed_note", "measured"} (measured = median over scenes)."""
    from .diagnostics import SEED_NOTE_ROWS

    by_preset = {r["preset"]: r for r in seed_rows}
    out = []
    for name, quoted in SEED_NOTE_ROWS.items():
        r = by_preset.get(name)
        if r is None:
            continue
        measured = {
            "R_samp_fro": r["R_samp_fro"]["median"],
            "R_blend_fro": r["R_blend_fro"]["median"],
            "loss": r["loss"],
            "grad": "finite" if r["ok"] else "NaN",
            "rank": r["R_blend_rank"]["median"],
        }
        for metric, value in quoted.items():
            out.append({"metric": metric, "preset": name, "seed_note": value, "measured": measured[metric]})
    return out


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """A list of flat dicts as a markdown table (numbers to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 02: eigenvalue spectra
@dataclass
class Spectra:
    """Descending eigenvalues [n,N] float per matrix, with K [n], and numerical rank / condition number /
    K-gap [n] per matrix."""

    eigvals: dict[str, torch.Tensor]
    rank: dict[str, torch.Tensor]
    cond: dict[str, torch.Tensor]
    gap: dict[str, torch.Tensor]
    K: torch.Tensor

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {"rank": _median(self.rank[name].double()), "cond": _median(self.cond[name]), "gap": _median(self.gap[name]),
                   "lambda_max": _median(self.eigvals[name][:, 0]), "lambda_min": _median(self.eigvals[name][:, -1])}
            for name in self.eigvals
        }


def spectra(cfg: ExperimentConfig, batch: SceneBatch, seed: int = 0) -> Spectra:
    """Eigen-spectra of R_true, R_samp, R_pred and R_blend of ``batch`` under ``cfg`` (see module doc)."""
    mats = pipeline_matrices(cfg, batch, seed=seed)
    ev, rank, cond, gap = {}, {}, {}, {}
    for name in MATRICES:
        s = spectrum_stats(mats.get(name), mats.K)
        ev[name], rank[name], cond[name], gap[name] = s["eigvals"], s["rank"], s["cond"], s["gap"]
    return Spectra(ev, rank, cond, gap, mats.K)


def _floor(ev: torch.Tensor) -> torch.Tensor:
    """Eigenvalues clipped below at 1e-12 of the largest, so a log axis can show zeros and rounding noise."""
    return ev.clamp_min(1e-12 * float(ev.abs().max()))


def spectrum_figure(spec: Spectra, scene: int = 0, matrices: Iterable[str] = MATRICES) -> Figure:
    """Sorted eigenvalues of one scene on a log axis, one line per matrix; K marked by a vertical line and
    the gap lambda_K - lambda_{K+1} of R_blend shaded. Values below 1e-12 lambda_max are drawn at that floor."""
    K = int(spec.K[scene])
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    idx = torch.arange(1, spec.eigvals["R_blend"].shape[-1] + 1)
    for name in matrices:
        ev = spec.eigvals[name][scene]
        ax.semilogy(idx, _floor(ev), ".-", ms=3, lw=1, color=COLOURS[name],
                    label=f"{name}: rank {int(spec.rank[name][scene])}, cond {float(spec.cond[name][scene]):.3g}")
    ev = spec.eigvals["R_blend"][scene]
    ax.axhspan(float(ev[K]), float(ev[K - 1]), color=COLOURS["R_blend"], alpha=0.15, label=f"R_blend gap λ_K-λ_K+1 = {float(ev[K-1]-ev[K]):.3g}")
    ax.axvline(K + 0.5, color="k", ls="--", lw=0.8, label=f"K = {K}")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue (trace-N units)")
    ax.set_title(f"Eigenvalue spectra, scene {scene}")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def spectrum_plotly(spec: Spectra, scene: int = 0):
    """The same view as :func:`spectrum_figure`, interactive (hover shows index and value)."""
    import plotly.graph_objects as go

    K = int(spec.K[scene])
    fig = go.Figure()
    for name in MATRICES:
        ev = _floor(spec.eigvals[name][scene]).tolist()
        fig.add_trace(go.Scatter(x=list(range(1, len(ev) + 1)), y=ev, mode="lines+markers", name=name, marker={"size": 3},
                                 line={"color": COLOURS[name]}))
    ev = spec.eigvals["R_blend"][scene]
    fig.add_hrect(y0=float(ev[K]), y1=float(ev[K - 1]), fillcolor=COLOURS["R_blend"], opacity=0.15, line_width=0)
    fig.add_vline(x=K + 0.5, line_dash="dash")
    fig.update_yaxes(type="log", title="eigenvalue")
    fig.update_xaxes(title="index (descending)")
    fig.update_layout(title=f"Eigenvalue spectra, scene {scene} (K = {K})", height=420)
    return fig


def loading_sweep(cfg: ExperimentConfig, batch: SceneBatch, c_eps_values: Sequence[float], seed: int = 0) -> list[dict]:
    """Effect of the diagonal loading C_EPS on R_blend's lower eigenvalues, one row per value:
    {"c_eps", "rank", "cond", "gap" (median lambda_K - lambda_{K+1}), "lower_min", "lower_max" (median over
    scenes of the smallest / largest of lambda_{K+1..N}), "lower_spread" (median (max-min)/max of them)}.
    Loading shifts every eigenvalue by C_EPS and leaves the gaps unchanged (DESIGN.md section 6)."""
    rows = []
    for c in c_eps_values:
        c_cfg = cfg.replace(**{"fixes.c_eps": float(c)})
        mats = pipeline_matrices(c_cfg, batch, seed=seed)
        s = spectrum_stats(mats.R_blend, mats.K)
        ev = s["eigvals"].double()
        pos = torch.arange(ev.shape[-1])[None, :]
        lower = pos >= mats.K[:, None]
        lo_min = torch.where(lower, ev, torch.inf).amin(-1)
        lo_max = torch.where(lower, ev, -torch.inf).amax(-1)
        rows.append({"c_eps": float(c), "rank": _median(s["rank"].double()), "cond": _median(s["cond"]), "gap": _median(s["gap"]),
                     "lower_min": _median(lo_min), "lower_max": _median(lo_max),
                     "lower_spread": _median((lo_max - lo_min) / lo_max.abs().clamp_min(1e-300))})
    return rows


def loading_figure(rows: list[dict]) -> Figure:
    """Lower eigenvalues, gap, and condition number of R_blend against C_EPS (log-log)."""
    c = [max(r["c_eps"], 1e-12) for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    a1.loglog(c, [max(r["lower_min"], 1e-16) for r in rows], "o-", label="min λ_{K+1..N}")
    a1.loglog(c, [max(r["lower_max"], 1e-16) for r in rows], "s-", label="max λ_{K+1..N}")
    a1.loglog(c, [max(r["gap"], 1e-16) for r in rows], "^-", label="gap λ_K-λ_{K+1}")
    a1.set_xlabel("C_EPS")
    a1.set_ylabel("median over scenes")
    a1.legend(fontsize=8)
    a1.set_title("loading lifts the floor, keeps the gap")
    a2.loglog(c, [r["cond"] if math.isfinite(r["cond"]) else float("nan") for r in rows], "o-")
    a2.set_xlabel("C_EPS")
    a2.set_ylabel("cond(R_blend)")
    a2.set_title("condition number")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# 03: NaN gradients, per eigen backend
def backend_reports(cfg: ExperimentConfig, batch: SceneBatch, model: torch.nn.Module, seed: int = 0) -> list[dict]:
    """One :func:`workbench.diagnostics.gradient_report` per gap backend (the other knobs as in ``cfg``) and
    per subspace backend. Rows: {"kind": "gap"|"subspace", "backend", "term", "term_value", "term_finite"
    (the term's own gradient is finite in every group), "term_grad_norm" {group}, "ok" (the total's), "grad_norm",
    "provenance"}."""
    from .config import GAP_BACKENDS, SUBSPACE_BACKENDS
    from .diagnostics import gradient_report

    rows = []
    for kind, backends in (("gap", GAP_BACKENDS), ("subspace", SUBSPACE_BACKENDS)):
        for b in backends:
            rep = gradient_report(cfg.replace(**{f"fixes.{kind}_backend": b}), batch, model, seed=seed)
            tg = rep["term_grad_norm"][kind]
            rows.append({"kind": kind, "backend": b, "term": kind, "term_value": rep["terms"][kind],
                         "term_finite": all(math.isfinite(v) for v in tg.values()), "term_grad_norm": tg, "ok": rep["ok"],
                         "loss": rep["loss"], "grad_norm": rep["grad_norm"], "provenance": rep["provenance"]})
    return rows


def _hermitian_direction(n: int, N: int, seed: int, dtype=torch.complex128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    E = torch.complex(torch.randn(n, N, N, generator=g, dtype=torch.float64), torch.randn(n, N, N, generator=g, dtype=torch.float64))
    E = 0.5 * (E + E.mH)
    return (E / torch.linalg.matrix_norm(E)[:, None, None]).to(dtype)


def degeneracy_check(cfg: ExperimentConfig, batch: SceneBatch, c_eps: float | None = None, dtype: torch.dtype = torch.complex64) -> list[dict]:
    """Heavy degeneracy, exactly: R = trace-normalised R_true + C_EPS I in ``dtype`` (complex64, the compute
    dtype of training, by default): a rank-K signal part, so N-K eigenvalues equal C_EPS to rounding.
    For every gap backend the eigengap hinge (margin 1e3,
    always active) and for every subspace backend the subspace energy at the true sources is
    back-propagated to R. Rows: {"term", "backend", "value", "grad_finite", "grad_norm", "error", "degenerate"
    (median count of eigenvalues within 8 eps(dtype) lambda_max of the smallest), "distinct" (median count of
    distinct values among those, i.e. exact ties leave 1)}."""
    from . import spectral
    from .config import GAP_BACKENDS, SUBSPACE_BACKENDS
    from .covariance import load, trace_normalise
    from .physics import steering

    c = cfg.fixes.c_eps if c_eps is None else c_eps
    R0 = load(trace_normalise(batch.R_true.to(dtype)), c)
    ev = torch.linalg.eigvalsh(R0)
    close = (ev - ev[:, :1]).abs() <= 8 * torch.finfo(ev.dtype).eps * ev[:, -1:].abs()
    degenerate = _median(close.sum(-1).double())
    distinct = _median(torch.tensor([float(torch.unique(e[m]).numel()) for e, m in zip(ev, close)]))
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    a_true = steering(cfg.system, batch.phi.to(real), batch.theta.to(real), torch.where(batch.mask, batch.r, 1.0).to(real))
    rows = []
    for term, backends in (("gap", GAP_BACKENDS), ("subspace", SUBSPACE_BACKENDS)):
        for b in backends:
            R = R0.clone().requires_grad_(True)
            if term == "gap":
                value = spectral.eigengap_hinge(R, batch.K, 1e3, cfg.fixes.eps_psd, b).sum()
            else:
                value = spectral.subspace_energy(R, a_true, batch.mask, batch.K, b, cfg.fixes.lorentzian_eps).sum()
            try:
                (g,) = torch.autograd.grad(value, R, allow_unused=True)
                err = None
            except RuntimeError as e:  # e.g. a phase-dependent eigenvector loss: PyTorch refuses
                g, err = None, str(e).splitlines()[0]
            gn = float("nan") if g is None and err else 0.0 if g is None else float(torch.linalg.vector_norm(g))
            rows.append({"term": term, "backend": b, "value": float(value.detach()), "grad_finite": err is None and math.isfinite(gn),
                         "grad_norm": gn, "error": err, "degenerate": degenerate, "distinct": distinct})
    return rows


def fd_check(cfg: ExperimentConfig, batch: SceneBatch, step: float = 1e-6, margin: float = 1e3, seed: int = 0) -> list[dict]:
    """Float64 finite-difference check of the eigengap hinge per gap backend, on the batch's real R_blend
    (complex128). With ``margin`` large the hinge is active, hinge = margin - gap, so the backend's gap is
    read off its value. For a random unit Hermitian direction E per scene: autograd's Re<grad, E> against
    (f(R + hE) - f(R - hE)) / 2h. Rows: {"backend", "gap" (median), "gap_eigvalsh" (independent median
    lambda_K - lambda_{K+1} of R_blend + EPS_PSD I), "hinge" (at the config's margin, mean), "autograd", "fd",
    "rel_err", "grad_finite"}."""
    from . import spectral
    from .config import GAP_BACKENDS
    from .covariance import load

    mats = pipeline_matrices(cfg, batch, seed=seed)
    R0, K = mats.R_blend.to(torch.complex128), mats.K
    E = _hermitian_direction(R0.shape[0], R0.shape[-1], seed)
    ref_gap = spectrum_stats(load(R0, cfg.fixes.eps_psd), K)["gap"]
    rows = []
    for b in GAP_BACKENDS:
        def f(R, m=margin, b=b):
            return spectral.eigengap_hinge(R, K, m, cfg.fixes.eps_psd, b)

        R = R0.clone().requires_grad_(True)
        h = f(R)
        (g,) = torch.autograd.grad(h.sum(), R, allow_unused=True)
        g = torch.zeros_like(R) if g is None else g
        auto = (g.conj() * E).real.sum((-2, -1))
        with torch.no_grad():
            fd = (f(R0 + step * E) - f(R0 - step * E)) / (2 * step)
            hinge = float(f(R0, cfg.fixes.gap_margin).mean())
        rel = ((auto - fd).abs() / fd.abs().clamp_min(1e-12)).double()
        rows.append({"backend": b, "gap": _median(margin - h.detach()), "gap_eigvalsh": _median(ref_gap), "hinge": hinge,
                     "autograd": _median(auto), "fd": _median(fd), "rel_err": float(rel.max()),
                     "grad_finite": bool(torch.isfinite(g).all())})
    return rows


def gradient_figure(rows: list[dict]) -> Figure:
    """Per backend, the gradient norm of its own term per parameter group (log bars); a red x marks NaN/inf."""
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 3.8))
    for ax, kind in zip(axes, ("gap", "subspace")):
        sub = [r for r in rows if r["kind"] == kind]
        groups = list(sub[0]["term_grad_norm"]) if sub else []
        w = 0.8 / max(len(groups), 1)
        nan_labelled = False
        for j, g in enumerate(groups):
            for i, r in enumerate(sub):
                v = r["term_grad_norm"][g]
                x = i + (j - (len(groups) - 1) / 2) * w
                if v == 0.0:  # no bar on a log axis: say it
                    ax.annotate("0", (x, 1e-12), ha="center", va="bottom", fontsize=8, color=f"C{j}")
                    ax.bar(x, 1e-12, w, color=f"C{j}", label=g if i == 0 else None)
                elif math.isfinite(v):
                    ax.bar(x, v, w, color=f"C{j}", label=g if i == 0 else None)
                else:
                    ax.plot(x, 1.0, "x", color="red", ms=10, mew=2, label=None if nan_labelled else "NaN/inf")
                    nan_labelled = True
        ax.set_yscale("log")
        ax.set_xticks(range(len(sub)), [r["backend"] for r in sub], rotation=20)
        ax.set_title(f"∇ of the {kind} term, per backend (0: exactly zero)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# 04: training curves
def training_figure(histories: dict[str, list[dict]]) -> Figure:
    """Three panels per preset (one line style per preset): loss terms per epoch (log), gradient norm per
    group per epoch (log), parameter change per epoch."""
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13.0, 3.8))
    styles = ["-", "--", ":", "-."]
    for i, (name, hist) in enumerate(histories.items()):
        ls = styles[i % len(styles)]
        ep = [h["epoch"] for h in hist]
        for j, term in enumerate(["total", *hist[0]["terms"]] if hist else []):
            ys = [h["train_loss"] if term == "total" else h["terms"][term] for h in hist]
            ys = [abs(y) if math.isfinite(y) and y != 0 else float("nan") for y in ys]
            a1.plot(ep, ys, ls, color=f"C{j}", marker="o", ms=3, label=f"{name}: {term}")
        for j, g in enumerate(hist[0]["grad_norm"] if hist else []):
            a2.plot(ep, [h["grad_norm"][g] for h in hist], ls, color=f"C{j}", marker="o", ms=3, label=f"{name}: {g}")
        a3.plot(ep, [h["param_change"] for h in hist], ls, marker="o", ms=3, label=name)
    a1.set_yscale("log")
    a1.set_title("loss terms (train)")
    a2.set_yscale("log")
    a2.set_title("gradient norm per group")
    a3.set_title("parameter change per epoch")
    for a in (a1, a2, a3):
        a.set_xlabel("epoch")
        a.legend(fontsize=6)
    fig.tight_layout()
    return fig


def summary_markdown(rows: list[dict], matrices: Sequence[str] = ("R_samp_raw", "R_samp", "R_pred", "R_blend")) -> str:
    """:func:`normalisation_rows` as one markdown table: preset, matrix, ||.||_F, trace, rank, cond (medians)."""
    flat = [{"preset": r["preset"], "matrix": m, **{k: r[m][k] for k in ("fro", "trace", "rank", "cond")}} for r in rows for m in matrices]
    return markdown_table(flat)


def gradient_conclusions(deg: list[dict], fd: list[dict], reports: list[dict], rtol: float = 1e-4) -> dict:
    """What 03 shows, as data computed from :func:`degeneracy_check`, :func:`fd_check` and :func:`backend_reports`."""
    gap_deg = {r["backend"]: r["grad_finite"] for r in deg if r["term"] == "gap"}
    sub_deg = {r["backend"]: r["grad_finite"] for r in deg if r["term"] == "subspace"}
    by_fd = {r["backend"]: r for r in fd}
    flip = {k: {"gap": by_fd[k]["gap"], "hinge": by_fd[k]["hinge"]} for k in ("eigh", "svd", "svd_flipped") if k in by_fd}
    return {
        "eigenvalue_only_gap_grad_finite_under_degeneracy": gap_deg,
        "subspace_grad_finite_under_degeneracy": sub_deg,
        "subspace_backends_finite_in_network": [r["backend"] for r in reports if r["kind"] == "subspace" and r["term_finite"]],
        "gap_backends_finite_in_network": [r["backend"] for r in reports if r["kind"] == "gap" and r["term_finite"]],
        "svd_flip": flip,
        "fd_agrees": [r["backend"] for r in fd if r["rel_err"] < rtol],
        "fd_disagrees": [r["backend"] for r in fd if not r["rel_err"] < rtol],
    }


# ---------------------------------------------------------------------------------------------
# 05: localisation from a covariance
def localisation_sources(cfg: ExperimentConfig, estimators: Sequence[str]) -> dict:
    """The covariances 05 localises from, by name: "R_true" and "R_samp[<estimator>]" for each estimator,
    each a callable(batch) -> [n,N,N] complex64 (hermitised; scale is irrelevant to MUSIC/MVDR)."""
    from .covariance import hermitise, sample_covariance

    def samp(est):
        return lambda b: hermitise(sample_covariance(b.y, b.G, est, cfg.system.ridge, b.noise_var, rank=cfg.system.K_max, system=cfg.system))

    return {"R_true": lambda b: b.R_true, **{f"R_samp[{e}]": samp(e) for e in estimators}}


def localisation_figure(res: dict) -> Figure:
    """RMSE of phi, theta (degrees) and r (metres) against SNR per covariance, with sqrt(CRB) dashed (log y)."""
    fig, axes = plt.subplots(1, 4, figsize=(15.0, 3.6))
    snr = res["snr_db"]
    for ax, (key, crb_key, unit) in zip(axes, (("rmse_phi_deg", "phi_deg", "deg"), ("rmse_theta_deg", "theta_deg", "deg"), ("rmse_r_m", "r_m", "m"))):
        for i, (name, m) in enumerate(res["covariances"].items()):
            ax.semilogy(snr, [v if v is not None else float("nan") for v in m[key]], "o-", color=f"C{i}", label=name)
        ax.semilogy(snr, [v if v is not None else float("nan") for v in res["sqrt_crb"][crb_key]], "k--", label="sqrt(CRB)")
        ax.set_xlabel("SNR (dB)")
        ax.set_ylabel(f"RMSE ({unit})")
        ax.set_title(key)
        ax.legend(fontsize=7)
    for i, (name, m) in enumerate(res["covariances"].items()):
        axes[3].plot(snr, m["f1"], "o-", color=f"C{i}", label=f"{name} F1")
        axes[3].plot(snr, m["k_accuracy"], "x:", color=f"C{i}", label=f"{name} K acc.")
    axes[3].set_ylim(-0.05, 1.05)
    axes[3].set_xlabel("SNR (dB)")
    axes[3].set_title(f"detection ({res['method']})")
    axes[3].legend(fontsize=6)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Sweeps (notebook 06): an Optuna study's trials as plain rows, and the static (matplotlib) views.
# The interactive views are workbench.sweep's plotly builders plus :func:`parallel_plotly` below.
OUTCOMES = ("complete", "pruned", "nonfinite", "failed")
OUTCOME_COLOURS = {"complete": "#2ca02c", "pruned": "#ff7f0e", "nonfinite": "#d62728", "failed": "#7f7f7f"}


def sweep_metrics(study) -> dict:
    """What a finished sweep says, as plain JSON: {"study", "states": {TrialState name: count over every
    trial}, "progress": :func:`workbench.sweep.progress_counts`, "best": {"number", "value", "params"} or
    None (lowest val_nmse over COMPLETE trials), "nonfinite": one row per trial pruned for a non-finite step
    {"number", "params", "nonfinite_steps", "provenance_count", "ops": sorted "term:op" strings, "provenance"},
    "outcome_fractions": :func:`workbench.sweep.outcome_fractions`}."""
    from optuna.trial import TrialState

    from . import sweep

    trials = study.get_trials(deepcopy=False)
    nonfinite = []
    for t in trials:
        if t.user_attrs.get("pruned_reason") == "nonfinite":
            prov = t.user_attrs.get("provenance", [])
            nonfinite.append({"number": t.number, "params": dict(t.params), "nonfinite_steps": t.user_attrs.get("nonfinite_steps", 0),
                              "provenance_count": t.user_attrs.get("provenance_count", len(prov)),
                              "ops": sorted({f"{p.get('term')}:{p.get('op')}" for p in prov}), "provenance": prov})
    summary = sweep.summarize(study)
    return {"study": study.study_name, "states": {s.name: sum(t.state == s for t in trials) for s in TrialState},
            "progress": summary["counts"], "best": summary["best"], "nonfinite": nonfinite,
            "outcome_fractions": sweep.outcome_fractions(study)}


def varying_params(study) -> list[str]:
    """Knobs that take more than one value among the COMPLETE trials (the only ones an importance can rank)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    names = sorted({k for t in done for k in t.params})
    return [n for n in names if len({repr(t.params.get(n)) for t in done}) > 1]


def sweep_importances(study) -> tuple[dict[str, float] | None, str]:
    """Importances of the varying knobs for val_nmse (Optuna's default evaluator, PED-ANOVA: deterministic,
    no scikit-learn), or (None, why not): it needs at least two
    COMPLETE trials and a knob that varies among them. Returns ({knob: importance in [0, 1]}, note)."""
    import optuna
    from optuna.trial import TrialState

    n = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    if n < 2:
        return None, f"parameter importances need at least 2 completed trials; this study has {n}: run more trials"
    names = varying_params(study)
    if not names:
        return None, f"no knob varies among the {n} completed trials: importances are undefined; run more trials"
    imp = optuna.importance.get_param_importances(study, params=names)
    return {k: float(v) for k, v in imp.items()}, f"PED-ANOVA over {n} completed trials, {len(names)} varying knob(s)"


def importances_plotly(study, params: Sequence[str]):
    """Parameter importances of ``params`` for val_nmse (plotly; the same evaluator as :func:`sweep_importances`)."""
    import optuna

    return optuna.visualization.plot_param_importances(study, params=list(params), target_name="val_nmse")


def _optuna_mpl(builder, *args, **kwargs) -> Figure:
    import warnings

    import optuna

    # Optuna's builders call plt.style.use("ggplot"): rc_context keeps that style out of every later figure
    with warnings.catch_warnings(), plt.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        ax = builder(*args, **kwargs)
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(8.0, 4.0)
    fig.tight_layout()
    return fig


def history_figure(study) -> Figure:
    """Optimisation history (val_nmse per completed trial and best so far), Optuna's matplotlib builder."""
    from optuna.visualization import matplotlib as om

    return _optuna_mpl(om.plot_optimization_history, study, target_name="val_nmse")


def importances_figure(study, params: Sequence[str]) -> Figure:
    """Parameter importances of ``params`` (see :func:`sweep_importances` for when they exist)."""
    from optuna.visualization import matplotlib as om

    return _optuna_mpl(om.plot_param_importances, study, params=list(params), target_name="val_nmse")


def parallel_rows(study) -> list[dict]:
    """One row per finished trial (COMPLETE, PRUNED, FAIL): {"number", "outcome" (one of OUTCOMES), "value"
    (the final val_nmse, or the last one reported before it stopped; None when none was), "params"}."""
    from optuna.trial import TrialState

    from .sweep import _outcome

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        value = t.value if t.state == TrialState.COMPLETE else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        rows.append({"number": t.number, "outcome": _outcome(t), "value": value, "params": dict(t.params)})
    return rows


def _parallel_axes(rows: list[dict]) -> list[dict]:
    """Axes of the parallel-coordinates view: each knob, val_nmse (missing values on a 'none' tick above the
    largest), the outcome. Each: {"label", "values" (float per row), "ticks" [(value, text)] or None}."""
    names = sorted({k for r in rows for k in r["params"]})
    axes = []
    for name in names:
        vals = [r["params"].get(name) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            axes.append({"label": name, "values": [float(v) for v in vals], "ticks": None})
        else:
            cats = sorted({str(v) for v in vals})
            axes.append({"label": name, "values": [float(cats.index(str(v))) for v in vals], "ticks": [(float(i), c) for i, c in enumerate(cats)]})
    finite = [r["value"] for r in rows if r["value"] is not None and math.isfinite(r["value"])]
    if finite:
        lo, hi = min(finite), max(finite)
        none = hi + 0.1 * (hi - lo or abs(hi) or 1.0)
        digits = next((d for d in range(4, 12) if f"{lo:.{d}g}" != f"{hi:.{d}g}"), 12)  # enough to tell lo from hi
        ticks = [(lo, f"{lo:.{digits}g}"), (hi, f"{hi:.{digits}g}")] if hi > lo else [(lo, f"{lo:.4g}")]
        axes.append({"label": "val_nmse", "values": [r["value"] if r["value"] is not None and math.isfinite(r["value"]) else none for r in rows],
                     "ticks": ticks + [(none, "none")]})
    axes.append({"label": "outcome", "values": [float(OUTCOMES.index(r["outcome"])) for r in rows],
                 "ticks": [(float(i), o) for i, o in enumerate(OUTCOMES)]})
    return axes


def parallel_plotly(rows: list[dict]):
    """Parallel coordinates of the knobs, val_nmse and the outcome of every finished trial (plotly),
    coloured by outcome: unlike Optuna's view it keeps the pruned and non-finite trials."""
    import plotly.graph_objects as go

    axes = _parallel_axes(rows)
    dims = []
    for a in axes:
        d = {"label": a["label"], "values": a["values"]}
        if a["ticks"]:
            d |= {"tickvals": [v for v, _ in a["ticks"]], "ticktext": [t for _, t in a["ticks"]]}
            lo, hi = min(v for v, _ in a["ticks"]), max(v for v, _ in a["ticks"])
            d["range"] = [lo, hi] if hi > lo else [lo - 0.5, hi + 0.5]
        dims.append(d)
    n = len(OUTCOMES) - 1
    scale = [[i / n, OUTCOME_COLOURS[o]] for i, o in enumerate(OUTCOMES)]
    line = {"color": [OUTCOMES.index(r["outcome"]) for r in rows], "colorscale": scale, "cmin": 0, "cmax": n}
    fig = go.Figure(go.Parcoords(dimensions=dims, line=line))
    fig.update_layout(title="Knobs versus outcome (every finished trial; colour: complete / pruned / non-finite / failed)")
    return fig


def parallel_figure(rows: list[dict]) -> Figure:
    """The parallel-coordinates view of :func:`parallel_plotly` as a static matplotlib figure: each axis
    scaled to [0, 1] over its ticks or values, one line per trial coloured by outcome."""
    axes = _parallel_axes(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(axes)), 4.0))
    scaled = []
    for a in axes:
        pts = a["values"] + [v for v, _ in a["ticks"] or []]
        lo, hi = min(pts, default=0.0), max(pts, default=1.0)
        span = hi - lo or 1.0
        scaled.append([(v - lo) / span for v in a["values"]])
        x = len(scaled) - 1
        ax.axvline(x, color="k", lw=0.8)
        for v, text in a["ticks"] or [(lo, f"{lo:.3g}"), (hi, f"{hi:.3g}")]:
            ax.text(x + 0.03, (v - lo) / span, text, fontsize=7, va="center")
    for i, r in enumerate(rows):
        ax.plot(range(len(axes)), [s[i] for s in scaled], color=OUTCOME_COLOURS[r["outcome"]], alpha=0.7, lw=1.2)
    for o in OUTCOMES:
        ax.plot([], [], color=OUTCOME_COLOURS[o], label=o)
    ax.set_xticks(range(len(axes)), [a["label"] for a in axes], rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes) - 0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Knobs versus outcome (every finished trial)")
    fig.tight_layout()
    return fig


def _short(label: str) -> str:
    """A float label to 3 significant digits (bin labels and other text unchanged)."""
    try:
        return f"{float(label):.3g}"
    except ValueError:
        return label


def outcomes_figure(rows: list[dict], param: str | None = None) -> Figure:
    """Stacked bars per knob value of :func:`workbench.sweep.outcome_fractions` rows: the fraction of trials
    that completed, were pruned, were non-finite or failed (one panel per knob, or only ``param``)."""
    names = [param] if param else sorted({r["param"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(max(4.0, 3.6 * len(names)), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        sub = [r for r in rows if r["param"] == name]
        x = range(len(sub))
        bottom = [0.0] * len(sub)
        for o in OUTCOMES:
            ax.bar(x, [r[o] for r in sub], bottom=bottom, color=OUTCOME_COLOURS[o], label=o)
            bottom = [b + r[o] for b, r in zip(bottom, sub)]
        ax.set_xticks(list(x), [f"{_short(r['value'])}\n(n={r['n']})" for r in sub], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("fraction of trials")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
