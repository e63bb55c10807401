"""Gradient diagnostics: per-group and per-term gradient norms, the ``ok`` flag and NaN provenance.

Owns: what one forward/backward pass says (:func:`gradient_report`) and where a NaN came from. Must not:
loop over presets or backends (the studies do: :mod:`workbench.studies.seed_note`, :mod:`.studies.gradients`),
or write a report as text (:func:`workbench.figures.gradients.format_report` does).

NaN provenance is data, not a traceback: :func:`nonfinite_origins` registers a hook on every node of a
term's autograd graph and records the nodes whose incoming gradient was finite but whose outgoing
gradient was not. Those are the operations that *created* the NaN/inf (for instance
``LinalgEighBackward0``), as opposed to the many downstream nodes that merely carried it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .config import ExperimentConfig
from .covariance import spectrum_stats
from .forward import forward, rsamp_cache
from .losses import TERMS, term_weights
from .model import CovarianceNet, build_model
from .physics import SceneBatch, simulate


def _finite(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.isfinite(t).all())


def group_norms(grads: Sequence[torch.Tensor | None], params: Sequence[torch.nn.Parameter], groups: dict[str, list]) -> dict[str, float]:
    """L2 norm of the gradient per named parameter group (nan/inf when any entry is non-finite)."""
    by_id = {id(p): g for p, g in zip(params, grads)}
    out = {}
    for name, ps in groups.items():
        sq = [by_id[id(p)].detach().abs().pow(2).sum() for p in ps if by_id.get(id(p)) is not None]
        out[name] = float(torch.stack(sq).sum().sqrt()) if sq else 0.0
    return out


def _graph_nodes(root) -> list:
    seen, stack, nodes = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return nodes


def nonfinite_origins(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> tuple[list[str], list[torch.Tensor | None]]:
    """Backpropagate ``loss`` to ``inputs`` and name the autograd nodes that turned finite incoming
    gradients into non-finite ones. Returns (node names in the order they fired, gradients)."""
    if loss.grad_fn is None:
        return [], [None] * len(inputs)
    origins: list[str] = []
    handles = []
    for node in _graph_nodes(loss.grad_fn):
        def hook(grad_inputs, grad_outputs, node=node):
            if all(_finite(g) for g in grad_outputs) and not all(_finite(g) for g in grad_inputs):
                origins.append(node.name())
        handles.append(node.register_hook(hook))
    try:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return origins, list(grads)


def provenance(losses: dict[str, torch.Tensor], model: CovarianceNet, weights: dict[str, float] | None = None) -> list[dict]:
    """One record per loss term whose gradient is non-finite: the term, whether it is in the total
    (non-zero weight), the operation(s) that produced the non-finite values and the parameter groups hit."""
    groups = model.groups()
    params = [p for ps in groups.values() for p in ps]
    records = []
    for term in TERMS:
        if term not in losses or not losses[term].requires_grad:
            continue
        origins, grads = nonfinite_origins(losses[term], params)
        norms = group_norms(grads, params, groups)
        bad = [g for g, v in norms.items() if not math.isfinite(v)]
        if bad or not _finite(losses[term]):
            records.append(
                {
                    "term": term,
                    "in_total": None if weights is None else weights.get(term, 0.0) != 0.0,
                    "forward_finite": _finite(losses[term].detach()),
                    "op": origins[0] if origins else "forward" if not _finite(losses[term].detach()) else "unknown",
                    "ops": sorted(set(origins)),
                    "groups": bad,
                }
            )
    return records


def gradient_report(cfg: ExperimentConfig, batch: SceneBatch | None = None, model: CovarianceNet | None = None,
                    seed: int = 0, n: int = 16) -> dict:
    """One real forward and backward pass under ``cfg`` (:func:`workbench.forward.forward`, R_samp from the batch's
    :func:`~workbench.forward.rsamp_cache`); everything as plain floats/lists.

    Returns {"loss", "terms", "weights", "grad_norm" {group}, "term_grad_norm" {term: {group}}, "ok",
    "provenance" [records], "norms" {R_samp, R_pred, R_blend Frobenius medians, rank_R_blend median}}.
    ``ok`` is the seed's flag: every group's gradient of the total is finite."""
    device = torch.device("cpu") if model is None else next(model.parameters()).device
    batch = simulate(cfg.system, n, seed=seed, device=device) if batch is None else batch
    model = build_model(cfg.system, cfg.model, device, seed=seed) if model is None else model
    groups = model.groups()
    params = [p for ps in groups.values() for p in ps]
    weights = term_weights(cfg)
    cache = rsamp_cache(batch)
    _, cov, losses = forward(model, batch, cache.rsamp_of(cfg), cfg, prior=cache.prior_of(cfg), losses=True)
    total_grads = torch.autograd.grad(losses["total"], params, retain_graph=True, allow_unused=True) \
        if losses["total"].requires_grad else [None] * len(params)
    grad_norm = group_norms(total_grads, params, groups)
    term_grad_norm = {}
    for term in TERMS:
        if not losses[term].requires_grad:  # a term this model does not have (e.g. ``detect`` without a heatmap)
            term_grad_norm[term] = group_norms([None] * len(params), params, groups)
            continue
        g = torch.autograd.grad(losses[term], params, retain_graph=True, allow_unused=True)
        term_grad_norm[term] = group_norms(g, params, groups)
    stats = spectrum_stats(cov.R_blend.detach())
    return {
        "loss": float(losses["total"].detach()),
        "terms": {k: float(v.detach()) for k, v in losses.items() if k != "total"},
        "weights": weights,
        "grad_norm": grad_norm,
        "term_grad_norm": term_grad_norm,
        "ok": all(math.isfinite(v) for v in grad_norm.values()),
        "provenance": provenance(losses, model, weights),
        "norms": {
            "R_samp": float(torch.linalg.matrix_norm(cov.R_samp).median()),
            "R_pred": float(torch.linalg.matrix_norm(cov.R_pred.detach()).median()),
            "R_blend": float(stats["fro"].median()),
            "rank_R_blend": float(stats["rank"].float().median()),
        },
    }


