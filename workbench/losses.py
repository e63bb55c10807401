"""Every loss term, returned by name, and their weighted total.

Terms (all means over the batch, float32 scalars):

* ``nmse``: ||R_blend - target||_F^2 / ||target||_F^2 of :func:`workbench.covariance.pipeline` (blend with
  R_samp, optional trace normalisation, C_EPS loading; the target of fact 4, :func:`~workbench.covariance.nmse_target`).
* ``k_ce``: cross-entropy of the K logits (class j <-> K = j + 1).
* ``aux``: permutation-invariant squared error of the (phi, theta, r) slots against the true sources,
  each coordinate scaled to [-1, 1] by the field of view; the minimum over assignments of slots to sources.
* ``gap``: the eigengap hinge relu(margin - (lambda_K - lambda_{K+1})) of R_blend + EPS_PSD I.
* ``subspace``: energy of the true steering vectors in the noise subspace of R_blend (MUSIC denominator).
* ``detect``: the detector head's heatmap loss (:func:`detection_loss`; zero for models without a heatmap).

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

TERMS = ("nmse", "k_ce", "aux", "gap", "subspace", "detect")
DETECT_SIGMA = 1.0  # width (grid cells) of the Gaussian around each true source's cell in the heatmap target
DETECT_FOCAL = (2.0, 4.0)  # focal exponents: (1 - p)^alpha at the sources' cells, (1 - target)^beta elsewhere


def term_weights(cfg: ExperimentConfig) -> dict[str, float]:
    """The weight of every term, by name."""
    w = cfg.loss
    return {"nmse": w.nmse, "k_ce": w.k_ce, "aux": w.aux, "gap": cfg.fixes.lam_gap, "subspace": w.subspace, "detect": w.detect}


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


def detection_loss(det, batch: SceneBatch) -> torch.Tensor:
    """The detector head's loss over the set of true sources, a scalar (:class:`workbench.detector.Detection` ``det``:
    logits [B,P,T,Q], offsets [B,3,P,T,Q] on its grid). Every true source is assigned the grid cell nearest to it
    (:meth:`workbench.grid.Grid.fractional_index`, rounded); the target heatmap is the maximum over sources of a
    Gaussian of :data:`DETECT_SIGMA` cells around those cells. Focal loss (CenterNet's, :data:`DETECT_FOCAL`):
    -(1-p)^2 log p at the sources' cells, -(1-target)^4 p^2 log(1-p) elsewhere; plus the L1 error of the predicted
    sub-cell offset at each source's cell against the source's position in it (cells of phi, theta, 1/r). Both are
    sums over sources and cells divided by the number of sources: invariant to the order of the true sources."""
    grid = det.grid
    shape = torch.tensor(grid.shape, device=det.logits.device, dtype=torch.float64)
    mask = batch.mask
    frac = grid.fractional_index(batch.phi.double(), batch.theta.double(), torch.where(mask, batch.r, 1.0).double())
    frac = torch.minimum(frac.clamp_min(0.0), shape - 1)  # [B,K,3]
    near = frac.round()
    axes = [torch.arange(n, device=frac.device, dtype=torch.float64) for n in grid.shape]
    d2 = sum((ax.view(*([1] * (2 + i)), -1, *([1] * (2 - i))) - near[:, :, i, None, None, None]) ** 2 for i, ax in enumerate(axes))
    gauss = torch.where(mask[:, :, None, None, None], torch.exp(-d2 / (2 * DETECT_SIGMA**2)), torch.zeros_like(d2))
    target = gauss.amax(1).float()  # [B,P,T,Q]
    pos = target >= 1.0 - 1e-6
    alpha, beta = DETECT_FOCAL
    logp, log1mp = F.logsigmoid(det.logits), F.logsigmoid(-det.logits)
    p = torch.sigmoid(det.logits)
    focal = torch.where(pos, -((1 - p) ** alpha) * logp, -((1 - target) ** beta) * p**alpha * log1mp).sum()
    b, k = mask.nonzero(as_tuple=True)
    cell = near[b, k].long()
    pred = det.offsets[b, :, cell[:, 0], cell[:, 1], cell[:, 2]]  # [n_sources,3]
    offset = (pred - (frac[b, k] - near[b, k]).float()).abs().sum()
    return (focal + offset) / mask.sum().clamp_min(1)


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
    if "detect" in terms:
        losses["detect"] = detection_loss(out.detection, batch) if out.detection is not None else torch.zeros((), device=R_samp.device)
    total = sum(weights[name] * value for name, value in losses.items() if weights[name] != 0.0)
    losses["total"] = total if isinstance(total, torch.Tensor) else torch.zeros((), device=R_samp.device)
    return losses, cov
