"""Every loss term, returned by name, and their weighted total.

Terms (all means over the batch, float32 scalars):

* ``nmse``: ||R_blend - target||_F^2 / ||target||_F^2 of :func:`workbench.covariance.pipeline` (blend with
  R_samp, optional trace normalisation, C_EPS loading; the target of fact 4, :func:`~workbench.covariance.nmse_target`).
* ``k_ce``: cross-entropy of the K logits (class j <-> K = j + 1).
* ``aux``: permutation-invariant squared error of the (phi, theta, r) slots against the true sources,
  each coordinate scaled to [-1, 1] by the field of view; the minimum over assignments of slots to sources.
* ``gap``: the eigengap hinge relu(margin - (lambda_K - lambda_{K+1})) of R_blend + EPS_PSD I.
* ``subspace``: energy of the true steering vectors in the noise subspace of R_blend (MUSIC denominator).

The eigen-terms take R_blend as :meth:`~workbench.covariance.Covariances.eigen_input` gives it: factored
(F F^H + C_EPS I, F thin) where the pipeline allows it, so the ``exact`` hinge and the ``safe`` subspace term
cost a K_max x K_max problem instead of an N x N one (:mod:`workbench.spectral`).

Weights: ``LossWeights`` for nmse/k_ce/aux/subspace and ``FixConfig.lam_gap`` for the gap: see
:func:`term_weights`, the one place they are read.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from . import spectral
from .config import ExperimentConfig, SystemConfig
from .covariance import Covariances, pipeline, predicted_covariance
from .model import ModelOutput
from .physics import SceneBatch, steering

TERMS = ("nmse", "k_ce", "aux", "gap", "subspace")


def term_weights(cfg: ExperimentConfig) -> dict[str, float]:
    """The weight of every term, by name."""
    w = cfg.loss
    return {"nmse": w.nmse, "k_ce": w.k_ce, "aux": w.aux, "gap": cfg.fixes.lam_gap, "subspace": w.subspace}


def covariances(out: ModelOutput, batch: SceneBatch, R_samp: torch.Tensor, cfg: ExperimentConfig) -> Covariances:
    """The covariance pipeline (:func:`workbench.covariance.pipeline`) of the network's prediction for ``batch``."""
    return pipeline(predicted_covariance(out.A, cfg.fixes.qr_retraction), R_samp, batch.R_true, cfg.fixes, factor=out.A)


def slot_costs(angles: torch.Tensor, batch: SceneBatch, system: SystemConfig) -> torch.Tensor:
    """Squared error of every slot against every true source, [B,slot,source] real: angles [B,K_max,3] (phi,
    theta in rad, r in m) against the batch's sources, each coordinate scaled to [-1, 1] by the field of view."""
    scale = angles.new_tensor([math.radians(system.phi_max_deg) or 1.0, math.radians(system.theta_max_deg) or 1.0,
                               (system.r_max_m - system.r_min_m) / 2 or 1.0])
    true = torch.stack([batch.phi, batch.theta, batch.r], -1)
    return (((angles[:, :, None, :] - true[:, None, :, :]) / scale) ** 2).sum(-1)


def best_assignment(cost: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cheapest one-to-one assignment of slots to the real sources of every scene (not differentiable).

    cost [B,slot,source], mask [B,source] bool (True for the scene's K real sources). Hungarian algorithm
    (scipy's linear_sum_assignment, O(K_max^3) per scene) on the detached cost. Returns index tensors
    (scene, slot, source) of the matched pairs, int64 [sum K] each, on the cost's device."""
    c, m = cost.detach().cpu().numpy(), mask.cpu().numpy()
    scenes, slots, sources = [], [], []
    for b in range(c.shape[0]):
        real = np.flatnonzero(m[b])
        rows, cols = linear_sum_assignment(c[b][:, real])
        scenes.append(np.full(len(rows), b))
        slots.append(rows)
        sources.append(real[cols])
    return tuple(torch.as_tensor(np.concatenate(x), dtype=torch.int64, device=cost.device) for x in (scenes, slots, sources))


def aux_loss(angles: torch.Tensor, batch: SceneBatch, system: SystemConfig) -> torch.Tensor:
    """Permutation-invariant slot loss, a scalar. angles [B,K_max,3] (phi, theta rad; r m). For each scene the K
    true sources are matched to the slots with the least total squared error (:func:`slot_costs`,
    :func:`best_assignment`); the loss is the matched cost / K, differentiable in the angles, averaged over
    scenes. Polynomial in K_max (the minimum over all K_max! permutations, without enumerating them)."""
    cost = slot_costs(angles, batch, system)
    scene, slot, source = best_assignment(cost, batch.mask)
    matched = cost.new_zeros(cost.shape[0]).index_add(0, scene, cost[scene, slot, source])
    return (matched / batch.K.clamp_min(1)).mean()


def compute_losses(out: ModelOutput, batch: SceneBatch, R_samp: torch.Tensor, cfg: ExperimentConfig,
                   terms: tuple[str, ...] | None = None) -> tuple[dict[str, torch.Tensor], Covariances]:
    """All loss terms by name plus ``total`` (the weighted sum of the terms with non-zero weight).

    Terms with weight 0 are still computed (and reported) unless ``terms`` leaves them out; they add
    nothing to the total's gradient. Returns (losses, covariances)."""
    fixes, weights = cfg.fixes, term_weights(cfg)
    terms = TERMS if terms is None else terms
    cov = covariances(out, batch, R_samp, cfg)
    K = batch.K
    losses: dict[str, torch.Tensor] = {}
    if "nmse" in terms:
        losses["nmse"] = cov.nmse().mean()
    if "k_ce" in terms:
        losses["k_ce"] = F.cross_entropy(out.k_logits, K - 1)
    if "aux" in terms:
        losses["aux"] = aux_loss(out.angles, batch, cfg.system)
    if "gap" in terms:
        losses["gap"] = spectral.eigengap_hinge(cov.eigen_input(), K, fixes.gap_margin, fixes.eps_psd, fixes.gap_backend).mean()
    if "subspace" in terms:
        a_true = steering(cfg.system, batch.phi, batch.theta, torch.where(batch.mask, batch.r, 1.0))
        losses["subspace"] = spectral.subspace_energy(
            cov.eigen_input(), a_true, batch.mask, K, fixes.subspace_backend, fixes.lorentzian_eps
        ).mean()
    total = sum(weights[name] * value for name, value in losses.items() if weights[name] != 0.0)
    losses["total"] = total if isinstance(total, torch.Tensor) else torch.zeros((), device=R_samp.device)
    return losses, cov
