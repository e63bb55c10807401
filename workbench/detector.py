"""The learned localiser (``model.head = "detector"``): measurements (y, H, codes) -> K, every source's (phi, theta, r,
power) and R_pred = sum_k p_k a_k a_k^H.

Owns: :class:`LocaliserNet` (features, the heatmap network, decoding the heatmap into sources, the likelihood
refinement call, pruning, further rounds), :func:`detection_grid`, :func:`detector_features` /
:func:`detector_atoms`, and what it returns beside :class:`~workbench.model.ModelOutput`'s fields
(:class:`Detection`, :class:`Sources`). Must not: define loss terms (the heatmap loss is
:func:`workbench.losses.detection_loss`), fit the likelihood itself (:func:`workbench.ml_fit.ml_refine` does),
move data between devices (:func:`workbench.forward.forward` does), train, score or draw.

Design (README, section 5 "The learned localiser"):

1. **Features**, no parameters, no gradient: the matched filter of the snapshots over a coarse search grid
   (:func:`detection_grid`, P x T x Q cells: ``model.detector_step_deg`` in phi and theta, ``model.detector_n_r``
   ranges uniform in 1/r), sum_l |a_g^H G_l^H y_l|^2 / ||G_l a_g||^2 (:func:`workbench.matched_filter.scan`, the ML
   fit's; normalising per snapshot matters: the summed normalisation puts a single source's maximum elsewhere), and
   the same after the strongest cell's atom is projected out of every snapshot (one step of the ML fit's matching
   pursuit: weak sources under a strong one's sidelobes show there).
   Both in log10, relative to the scene's maximum: free of units, of the SNR's scale and of the noise variance.
2. **Heatmap**: a small dilated 2-D CNN over (phi, theta) with the Q ranges as channels (``model.width`` channels,
   ``model.layers`` residual blocks) gives a source-presence logit and a sub-cell offset (phi, theta, 1/r; within
   +-1/2 cell) per cell. Trained with :func:`workbench.losses.detection_loss` (a focal loss against the cells that hold
   the true sources, and the offsets there: a loss over the set of sources, invariant to their order).
3. **Decoding**: the local maxima of the probability map (3 x 3 x 3 neighbourhood), the K_max largest; a peak is a
   source when its probability exceeds ``model.detector_threshold`` (the strongest one always is: K >= 1). The count
   has logits log P(K = k) of independent peaks (``k_logits``, argmax = the count).
4. **Refinement** (evaluation mode, ``model.refine_iters`` > 0): that many Fisher-scoring steps of the snapshot
   likelihood from the detections (:func:`workbench.ml_fit.ml_refine`), which also estimates the powers and the
   noise variance; then sources below ``model.detector_min_snr_db`` and duplicates are dropped
   (:meth:`LocaliserNet.prune`).
5. **More rounds** (``model.detector_rounds`` > 1): the snapshots given the kept sources' fit are read again by the same
   network as a scene of their own, its new peaks added, all refined and pruned again (:meth:`LocaliserNet.next_round`):
   sources a strong one hid show there. ``model.detector_reread`` says how they are read (:meth:`LocaliserNet.reread`):
   "project" removes the kept sources' least-squares fit from every snapshot; "whiten" reads the snapshots and
   measurement matrices in the coordinates where the kept sources' fitted covariance is white (measured on the dev
   split: neither better at both SNRs with a network trained on whole scenes; README, section 5).
   ``model.detector_round_picks`` = "network+likelihood" (the entry's) also proposes, in every such round, the ML fit's
   likelihood pick given the kept sources' fit (:func:`workbench.ml_fit.likeliest_source`), which sees weak sources
   that the re-read maps hide beside strong ones (the channel is nearly rank one), where its unrefined gain exceeds
   :data:`ROUND_PICK_GATE` times one source's MDL price.

6. **The count** (``model.detector_count``): "threshold" keeps what 3.-5. keep; "mdl" orders those by array SNR, refits
   the first k jointly for every k and keeps the k minimising the ML fit's MDL criterion
   (:meth:`LocaliserNet.mdl_count`: the heatmap proposes, the likelihood ratio counts).
7. **RELAX** (``model.detector_relax`` cycles, default 0; the entry's 1): after the rounds, before the count (or after
   a given count's rounds), each kept source in turn is replaced by the network's strongest peak on the snapshots read
   again given the other sources' fit and, in a second try, by the ML fit's likelihood pick given them
   (:func:`workbench.ml_fit.likeliest_source`); all refitted, a move kept where the likelihood rises
   (:meth:`LocaliserNet.relax`: the ML fit's RELAX cycle, :func:`workbench.ml_fit.ml_localise`'s ``relax_cycles``, with
   the network proposing too).
8. **A given count** (``count`` of :meth:`LocaliserNet.forward`, oracle knowledge: the true K for the RMSE peers report
   with K given): after the rounds above, more rounds add the residual's strongest peaks whatever their score until
   each scene has that many sources, and the strongest that many (by array SNR) are kept
   (:meth:`LocaliserNet.strongest`). Without refinement the strongest ``count`` heatmap peaks are taken.

The exact spherical steering vector (:func:`workbench.physics.steering`) builds R_pred.

Nothing of a scene but y, H and the codes is read: not K (unless given as ``count``, labelled oracle), not the noise
variance, not R_true (tests/test_localiser.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError, ModelConfig, SystemConfig
from .grid import Grid
from .likelihood import array_snr, whiten
from .likelihood import atoms as likelihood_atoms
from .matched_filter import atom_norms, pick, project_out, scan
from .ml_fit import RELAX_TOL, likeliest_source, mdl_criterion, mdl_penalty, ml_refine
from .model import CovarianceNet, ModelOutput
from .physics import measurement_matrices, source_covariance, steering

# model fields outside the weights: a trained model's decoding (LocaliserNet.set_decoding)
DECODING_FIELDS = ("detector_threshold", "detector_min_snr_db", "detector_rounds", "refine_iters", "detector_count", "detector_relax",
                   "detector_reread", "detector_round_picks")
N_FEATURES = 2  # feature maps per cell: the matched filter, and the same after one matching-pursuit step
HEAT_PRIOR = 0.01  # the heatmap's initial probability per cell (the bias of its last layer)
# the share of the trace the factor A gives each slot that is not a source (the next peaks): R_pred keeps rank K_max, so
# MUSIC asked for more sources than the localiser counted takes its next peaks instead of a flat noise subspace (where
# the joint subspace refinement never converges); Sources.covariance leaves them out
PAD_SHARE = 1e-4
# a round's likelihood pick is proposed only where its gain before refinement exceeds this many times one source's MDL
# price (4 x the per-parameter penalty): chosen on the dev split among 0 (no gate), 1, 2 and 3 (README, section 5)
ROUND_PICK_GATE = 2.0



def detection_grid(system: SystemConfig, cfg: ModelConfig) -> Grid:
    """The detector's search grid: :meth:`Grid.default` with ``cfg.detector_step_deg`` and ``cfg.detector_n_r``."""
    return Grid.default(system, step_deg=cfg.detector_step_deg, n_r=cfg.detector_n_r)


def _h_mean_square(H: torch.Tensor) -> torch.Tensor:
    """The mean square of each scene's H [B,M,N], [B,1] float64: a power in mW times it is in the units of
    :func:`detector_atoms`' G (H normalised by its RMS)."""
    return H.abs().square().mean((1, 2)).clamp_min(1e-30).to(torch.float64)[:, None]


@torch.no_grad()
def detector_atoms(system: SystemConfig, grid: Grid, H: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the features need of a scene's channel and codes alone (not of y), so several rounds share it: G [B,L,M,N]
    complex64 (H normalised by its RMS) and the atom norms ||G_l a_g||^2 [B,L,P*T*Q] (:func:`~workbench.matched_filter.atom_norms`,
    the features' largest cost)."""
    H = H.to(torch.complex64) / H.abs().square().mean((1, 2)).clamp_min(1e-30).sqrt()[:, None, None]
    G = measurement_matrices(H, codes.to(torch.complex64))
    return G, atom_norms(system, grid, G)


@torch.no_grad()
def detector_features(system: SystemConfig, grid: Grid, y: torch.Tensor, H: torch.Tensor, codes: torch.Tensor,
                      atoms: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The detector's feature maps [B,N_FEATURES,P,T,Q] float32 on ``grid`` (:func:`detection_grid`) of y [B,L,M],
    H [B,M,N], codes [B,L,N] (module docstring, 1.; log10 power relative to the scene's maximum, floored at -8); atoms:
    :func:`detector_atoms` of H and the codes when already computed. No gradient.
    :meth:`workbench.forward.RsampCache.prior_of` keeps them per scene for training."""
    G, norm2 = detector_atoms(system, grid, H, codes) if atoms is None else atoms
    y = y.to(torch.complex64) / y.abs().square().mean((1, 2)).clamp_min(1e-30).sqrt()[:, None, None]
    S = scan(system, grid, G, y, norm2)  # [B,P*T*Q]
    g = pick(grid, S)  # the strongest cell, [B,3]
    b = (G @ grid.vectors(system, g)[:, None, :, None])[..., 0]  # its atom G_l a_g, [B,L,M]
    S2 = scan(system, grid, G, project_out(y, b[:, :, None, :]), norm2)
    top = S.amax(1, keepdim=True).clamp_min(1e-30)
    feats = torch.stack([(S / top).clamp_min(1e-8).log10(), (S2 / top).clamp_min(1e-8).log10()], 1)
    return feats.reshape(len(y), N_FEATURES, *grid.shape).float()


@dataclass
class Detection:
    """The heatmap of a batch: logits [B,P,T,Q] float32 (source presence per cell of ``grid``), offsets [B,3,P,T,Q]
    float32 (sub-cell position of a source in the cell, in cells of phi, theta and 1/r, within +-1/2), and the
    features it was computed from (:meth:`LocaliserNet.features`, [B,N_FEATURES,P,T,Q] log10 relative power; None when
    not kept)."""

    logits: torch.Tensor
    offsets: torch.Tensor
    grid: Grid
    features: torch.Tensor | None = None


@dataclass
class Sources:
    """The localiser's sources: K [B] int64 (1..K_max); phi, theta [B,K_max] rad, r [B,K_max] m, power [B,K_max] mW
    (float64 after refinement, else float32; slot j < K[b] real, the rest padding with power 0); mask [B,K_max] bool;
    score [B,K_max] the heatmap probability of each slot's peak (descending); noise_var [B] mW per complex entry
    (estimated from the snapshots: the refinement's, or without one the residual energy after the sources' fit)."""

    K: torch.Tensor
    phi: torch.Tensor
    theta: torch.Tensor
    r: torch.Tensor
    power: torch.Tensor
    mask: torch.Tensor
    score: torch.Tensor
    noise_var: torch.Tensor

    def covariance(self, system: SystemConfig) -> torch.Tensor:
        """R_pred = sum_k p_k a_k a_k^H [B,N,N] complex64 in mW (exact steering, as R_true is built)."""
        return source_covariance(system, self.phi, self.theta, torch.where(self.mask, self.r, torch.ones_like(self.r)),
                                 self.power, self.mask)


class _Block(nn.Module):
    """x + W2 gelu(W1 x): two 3 x 3 convolutions, dilations d and 2d, residual (one block sees 7 d + 1 cells across)."""

    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv2d(width, width, 3, padding=2 * dilation, dilation=2 * dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(nn.functional.gelu(self.conv(x)))


class LocaliserNet(CovarianceNet):
    """The learned localiser (module docstring). A :class:`CovarianceNet` by type (the training loop, checkpoints and
    :func:`workbench.forward.forward` take it as any model) with its own body: ``backbone`` (the CNN) and ``head``
    (heatmap and offsets)."""

    def __init__(self, system: SystemConfig, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.system, self.cfg = system, cfg
        self.grid = detection_grid(system, cfg)
        P, T, Q = self.grid.shape
        W = cfg.width
        pos = torch.stack(torch.meshgrid(torch.linspace(-1, 1, P), torch.linspace(-1, 1, T), indexing="ij"))
        self.register_buffer("pos", pos, persistent=False)  # [2,P,T] phi, theta scaled to [-1, 1]
        self.backbone = nn.ModuleDict({"embed": nn.Conv2d(N_FEATURES * Q + 2, W, 3, padding=1),
                                       "blocks": nn.ModuleList([_Block(W, 2 ** (i % 2)) for i in range(cfg.layers)])})
        self.head = nn.ModuleDict({"heat": nn.Conv2d(W, Q, 1), "offset": nn.Conv2d(W, 3 * Q, 1)})
        nn.init.constant_(self.head["heat"].bias, math.log(HEAT_PRIOR / (1 - HEAT_PRIOR)))
        self.N, self.K_max = system.N, system.K_max
        self._validating = False

    @contextlib.contextmanager
    def validation(self):
        """Within the block the model does not refine (as in training mode): the training loop's validation scores the
        heatmap, the loss it trains on, without paying the likelihood steps every epoch (:func:`workbench.train.evaluate`)."""
        self._validating = True
        try:
            yield
        finally:
            self._validating = False

    def set_decoding(self, **fields) -> None:
        """Change the decoding settings of a trained model (:data:`DECODING_FIELDS` of ``model``: they do not touch the
        weights), e.g. a run trained before they were chosen. ConfigError for another field or a bad value."""
        bad = sorted(set(fields) - set(DECODING_FIELDS))
        if bad:
            raise ConfigError(f"decoding: {', '.join(bad)} cannot change on a trained model; allowed: {', '.join(DECODING_FIELDS)}")
        self.cfg = self.cfg.replace(**fields)

    # -- 1. features ------------------------------------------------------------------------------
    def features(self, y: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, atoms=None) -> torch.Tensor:
        """:func:`detector_features` on this model's grid: [B,N_FEATURES,P,T,Q] float32."""
        return detector_features(self.system, self.grid, y, H, codes, atoms)

    # -- 2. heatmap -------------------------------------------------------------------------------
    def heatmap(self, feats: torch.Tensor, amp: bool = False) -> Detection:
        """The :class:`Detection` of feature maps [B,N_FEATURES,P,T,Q] (module docstring, 2.)."""
        B, F, P, T, Q = feats.shape
        x = torch.cat([feats.permute(0, 1, 4, 2, 3).reshape(B, F * Q, P, T), self.pos.expand(B, -1, -1, -1)], 1)
        amp_dtype = torch.float16 if x.is_cuda else torch.bfloat16
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp):
            h = nn.functional.gelu(self.backbone["embed"](x))
            for block in self.backbone["blocks"]:
                h = block(h)
            logits, off = self.head["heat"](h).float(), self.head["offset"](h).float()
        logits = logits.permute(0, 2, 3, 1)  # [B,P,T,Q]
        offsets = 0.5 * torch.tanh(off.view(B, 3, Q, P, T).permute(0, 1, 3, 4, 2))  # [B,3,P,T,Q]
        return Detection(logits=logits, offsets=offsets, grid=self.grid, features=feats)

    # -- 3. decoding ------------------------------------------------------------------------------
    def decode(self, det: Detection, count: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The K_max strongest local maxima of the heatmap: (score [B,K_max] descending probabilities, keep [B,K_max]
        bool (score above the threshold; slot 0 always), phi, theta, r [B,K_max] float32 (cell + offset, inside the field
        of view; differentiable in the offsets), k_logits [B,K_max] (log P(K = k) of independent peaks, relative to the
        threshold: argmax + 1 = keep.sum(1))). count: [B] int64 given counts (oracle knowledge, e.g. the true K for the
        peers' RMSE): keep the ``count[b]`` strongest peaks instead of thresholding (0 keeps none)."""
        prob = torch.sigmoid(det.logits)
        peak = nn.functional.max_pool3d(prob[:, None].detach(), 3, stride=1, padding=1)[:, 0] == prob.detach()
        k = min(self.K_max, prob[0].numel())
        score, flat = torch.where(peak, prob, torch.zeros_like(prob)).flatten(1).topk(k, dim=1)
        if k < self.K_max:
            score, flat = nn.functional.pad(score, (0, self.K_max - k)), nn.functional.pad(flat, (0, self.K_max - k))
        idx = self.grid.unravel(flat)  # [B,K_max,3]
        off = det.offsets.flatten(2).gather(2, flat[:, None, :].expand(-1, 3, -1)).mT  # [B,K_max,3]
        phi, theta, r = self.grid.from_fractional(idx.to(off.dtype) + off)
        s = self.system
        pm, tm = math.radians(s.phi_max_deg), math.radians(s.theta_max_deg)
        phi, theta, r = phi.clamp(-pm, pm), theta.clamp(-tm, tm), r.clamp(s.r_min_m, s.r_max_m)
        thr = self.cfg.detector_threshold
        if count is None:
            keep = score > thr
            keep[:, 0] = True
        else:
            keep = torch.arange(self.K_max, device=score.device)[None, :] < count[:, None]
        sc = score.clamp(1e-6, 1 - 1e-6)
        gain = (sc.log() - math.log(thr)) - ((1 - sc).log() - math.log(1 - thr))  # log-odds of a peak vs the threshold
        k_logits = gain.cumsum(1)  # log P(K = k) up to a constant: the first k peaks sources, the rest not
        return score, keep, phi, theta, r, k_logits

    # -- 4. after the refinement ------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, H, codes, score, keep, phi, theta, r, power, noise_var, k_logits, counted: bool = False) -> tuple[torch.Tensor, ...]:
        """Drop refined sources the snapshots do not support: a per-snapshot SNR p_k mean_l ||G_l a_k||^2 / sigma^2
        below ``model.detector_min_snr_db`` (default 0 dB: a source of SNR s raises the log-likelihood by about
        L (s - log(1 + s)), which pays the ML fit's MDL penalty of 4 x 1.5 log(L) / 2 for s >= ~1.4 at L = 16), and the
        weaker of two sources refined to within half a grid cell of each other (two peaks on one source); the strongest
        source always stays. The slots are reordered so the kept sources come first, in heatmap order, and the count's
        logits follow (a dropped peak's log-odds set to -30). H [B,M,N], codes [B,L,N]; the rest as :meth:`decode` and
        :func:`~workbench.ml_fit.ml_refine` return them. counted: the count was given (:meth:`decode`'s ``count``):
        only duplicates are dropped, not weak sources. Returns (score, keep, phi, theta, r, power, k_logits)."""
        snr = array_snr(self.system, H, codes, phi, theta, r, power, noise_var)
        alive = keep if counted else keep & (snr >= 10 ** (self.cfg.detector_min_snr_db / 10))
        f = self.grid.fractional_index(phi, theta, r)
        close = (f[:, :, None] - f[:, None, :]).abs().amax(-1) < 0.5  # [B,i,j]
        alive = alive & ~(close & (snr[:, None, :] > snr[:, :, None]) & alive[:, None, :]).any(-1)
        rows = torch.arange(len(snr), device=snr.device)
        alive[rows, torch.where(keep, snr, torch.full_like(snr, -math.inf)).argmax(1)] = True
        return self._compact(alive, score, phi, theta, r, power, k_logits)

    @staticmethod
    def _compact(alive, score, phi, theta, r, power, k_logits) -> tuple[torch.Tensor, ...]:
        """The slots reordered so the ``alive`` [B,K_max] ones come first (stable: their order kept), powers of the rest
        zeroed and the count's logits following (a dropped slot's log-odds set to -30). Returns (score, keep, phi,
        theta, r, power, k_logits)."""
        order = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)
        take = lambda t: t.gather(1, order)  # noqa: E731
        gain = torch.diff(k_logits, dim=1, prepend=torch.zeros_like(k_logits[:, :1]))
        alive = take(alive)
        k_logits = torch.where(alive, take(gain), torch.full_like(gain, -30.0)).cumsum(1)
        return take(score), alive, take(phi), take(theta), take(r), take(power) * alive, k_logits

    @torch.no_grad()
    def mdl_count(self, y, H, codes, score, keep, phi, theta, r, k_logits) -> tuple[torch.Tensor, ...]:
        """``model.detector_count = "mdl"``: the kept sources ordered by array SNR (:func:`~workbench.likelihood.array_snr`
        at the start powers :func:`~workbench.ml_fit.ml_refine` gives the whole kept set, before any scoring step),
        the first k refitted jointly for every k = 1..kept (``model.refine_iters`` scoring steps each), and the k
        minimising the ML fit's criterion (:func:`~workbench.ml_fit.mdl_criterion`) kept with its fit. The count's
        logits are minus the criterion (relative to its minimum; -30 beyond the kept). Arguments as :meth:`prune` takes
        them, without power and noise variance (refitted); returns (score, keep, phi, theta, r, power, noise_var,
        k_logits)."""
        B, Kmax = keep.shape
        _, _, _, power, noise_var = ml_refine(y, H, codes, self.system, phi, theta, r, keep, 0)
        snr = array_snr(self.system, H, codes, phi, theta, r, power, noise_var, mask=keep)  # 0 in unkept slots: last
        order = torch.sort(snr, dim=1, descending=True, stable=True).indices
        score, keep, phi, theta, r, k_logits = (t.gather(1, order) for t in (score, keep, phi, theta, r, k_logits))
        n = keep.sum(1)
        slots = torch.arange(Kmax, device=keep.device)
        fits, crit = [], torch.full((B, Kmax), math.inf, dtype=torch.float64, device=keep.device)
        for k in range(1, int(n.max()) + 1):
            mask = slots[None, :] < torch.clamp(n, max=k)[:, None]
            *f, nll = ml_refine(y, H, codes, self.system, phi, theta, r, mask, self.cfg.refine_iters, with_nll=True)
            fits.append(f)
            crit[:, k - 1] = torch.where(n >= k, mdl_criterion(nll, mask.sum(1).double(), mdl_penalty(self.system)), math.inf)
        best = crit.argmin(1)  # k - 1 per scene
        pick = lambda j: torch.stack([f[j] for f in fits], 1)[torch.arange(B, device=best.device), best]  # noqa: E731
        keep = slots[None, :] <= best[:, None]
        phi, theta, r = (torch.where(keep, pick(j).to(t.dtype), t) for j, t in enumerate((phi, theta, r)))
        power, noise_var = pick(3) * keep, pick(4)
        k_logits = torch.where(torch.isfinite(crit), (crit.amin(1, keepdim=True) - crit).to(k_logits.dtype), torch.full_like(k_logits, -30.0))
        return score, keep, phi, theta, r, power, noise_var, k_logits

    @torch.no_grad()
    def strongest(self, H, codes, count, score, keep, phi, theta, r, power, noise_var, k_logits) -> tuple[torch.Tensor, ...]:
        """Of the kept sources, the ``count[b]`` [B] with the highest array SNR
        (:func:`~workbench.likelihood.array_snr`); fewer where fewer are kept. Arguments and returns as :meth:`prune`."""
        snr = array_snr(self.system, H, codes, phi, theta, r, power, noise_var, mask=keep)  # 0 in unkept slots: last
        rank = snr.argsort(1, descending=True).argsort(1)
        return self._compact(keep & (rank < count[:, None]), score, phi, theta, r, power, k_logits)

    @torch.no_grad()
    def residual(self, y, H, codes, phi, theta, r, keep) -> torch.Tensor:
        """The snapshots y [B,L,M] with the ``keep`` [B,K] sources' least-squares fit removed, per snapshot (exact
        steering atoms G_l a_k, :func:`~workbench.matched_filter.project_out`; unkept atoms are zero and take no part):
        [B,L,M] complex128."""
        c128 = torch.complex128
        a = steering(self.system, phi.double(), theta.double(), r.double()) * keep[..., None]  # [B,K,N]
        b = (H.to(c128)[:, None] @ (codes.to(c128)[:, :, None, :] * a[:, None]).mT).mT  # atoms G_l a_k, [B,L,K,M]
        return project_out(y.to(c128), b)

    @torch.no_grad()
    def reread(self, y, H, codes, atoms, phi, theta, r, keep, power, noise_var) -> torch.Tensor:
        """The feature maps of the snapshots given the ``keep`` [B,K] sources' fit (phi, theta, r, power [B,K] in mW,
        noise_var [B]), as ``model.detector_reread`` says (module docstring, 5.): "project", of :meth:`residual`; "whiten",
        of the snapshots and measurement matrices in the coordinates where the fit's covariance is white
        (:func:`~workbench.likelihood.whiten`; the atom norms recomputed there). atoms: :func:`detector_atoms` of H and
        the codes. Returns [B,N_FEATURES,P,T,Q] as :meth:`features`."""
        if self.cfg.detector_reread == "project":
            return self.features(self.residual(y, H, codes, phi, theta, r, keep), H, codes, atoms)
        G = atoms[0]
        b = likelihood_atoms(self.system, G, phi.double(), theta.double(), r.double(), keep)
        Gw, yw = whiten(G, y, b, power.double() * _h_mean_square(H) * keep, noise_var.double())
        Gw = Gw.to(torch.complex64)
        return self.features(yw, H, codes, (Gw, atom_norms(self.system, self.grid, Gw)))

    @torch.no_grad()
    def relax(self, y, H, codes, amp, atoms, keep, phi, theta, r) -> tuple[torch.Tensor, ...]:
        """``model.detector_relax`` RELAX cycles over the kept sources (module docstring, 7.): slot j of every scene
        that has one, in turn, replaced by the strongest heatmap peak of the snapshots read again given the other kept
        sources' fit (:meth:`reread`, then heatmap and decoding as a scene of its own), and in a second try by the ML
        fit's likelihood pick given them (:func:`~workbench.ml_fit.likeliest_source`); each try refitted (``model.refine_iters`` steps of
        :func:`~workbench.ml_fit.ml_refine`) and kept where the negative log-likelihood drops by more than
        :data:`~workbench.ml_fit.RELAX_TOL`. The set's size does not change. keep [B,K_max] (the kept sources
        first), phi, theta, r [B,K_max]; atoms: :func:`detector_atoms` of H and the codes
        (None: computed here, once). Returns (phi, theta, r, power, noise_var, nll [B]: the negative log-likelihood of the
        result, scene units) refitted."""
        iters = self.cfg.refine_iters
        atoms = detector_atoms(self.system, self.grid, H, codes) if atoms is None else atoms
        *fit, nll = ml_refine(y, H, codes, self.system, phi, theta, r, keep, iters, with_nll=True)
        phi, theta, r = (torch.where(keep, u.float(), v) for u, v in zip(fit[:3], (phi, theta, r)))
        power, noise_var = fit[3], fit[4]
        one = torch.ones(len(y), dtype=torch.int64, device=y.device)
        to_g = _h_mean_square(H)  # mW -> the units of the detector atoms' G
        for _ in range(self.cfg.detector_relax):
            for j in range(int(keep.sum(1).max())):
                has = keep[:, j] & (keep.sum(1) > 1)  # a lone source's residual is y itself: nothing to re-read
                if not bool(has.any()):
                    continue
                others = keep.clone()
                others[:, j] = False
                feats = self.reread(y, H, codes, atoms, phi, theta, r, others, power, noise_var)
                _, _, p2, t2, r2, _ = self.decode(self.heatmap(feats, amp), one)
                # the network's strongest peak, and the ML fit's pick given the others
                cands = [(p2[:, 0], t2[:, 0], r2[:, 0]),
                         likeliest_source(self.system, self.grid, *atoms, y, phi, theta, r, power * to_g, noise_var, others)[1:4]]
                slot = has[:, None] & (torch.arange(keep.shape[1], device=keep.device) == j)  # [B,K_max]
                for cp, ct, cr in cands:
                    tried = [torch.where(slot, v[:, None].to(u.dtype), u) for u, v in ((phi, cp), (theta, ct), (r, cr))]
                    *f, nll_try = ml_refine(y, H, codes, self.system, *tried, keep, iters, with_nll=True)
                    better = has & (nll_try < nll - RELAX_TOL)
                    phi, theta, r = (torch.where(better[:, None] & keep, u.float(), v) for u, v in zip(f[:3], (phi, theta, r)))
                    power = torch.where(better[:, None], f[3], power)
                    noise_var, nll = torch.where(better, f[4], noise_var), torch.where(better, nll_try, nll)
        return phi, theta, r, power * keep, noise_var, nll

    @torch.no_grad()
    def next_round(self, y, H, codes, amp, score, keep, phi, theta, r, power, noise_var, k_logits, atoms,
                   count=None) -> tuple[torch.Tensor, ...]:
        """One more round of detection (``model.detector_rounds`` > 1; evaluation mode): the snapshots given the kept
        sources' fit (power [B,K_max] mW, noise_var [B]; :meth:`reread`) are read as a scene of their own (features,
        heatmap, decoding: sources the strong ones hid), the new peaks are appended after the kept sources
        (up to K_max slots; with ``model.detector_round_picks`` = "network+likelihood", in the ordinary rounds, not in
        those that fill a given count, the ML fit's likelihood pick given the kept fit first, where its gain before
        refinement exceeds :data:`ROUND_PICK_GATE` times one source's MDL price),
        and all are refined jointly and pruned again. count: [B] given counts (:meth:`decode`): the
        new peaks fill the kept sources up to it, whatever their score. Returns (score, keep, phi, theta, r, power,
        noise_var, k_logits) as :meth:`forward` uses them."""
        need = None if count is None else (count - keep.sum(1)).clamp_min(0)
        feats = self.reread(y, H, codes, atoms, phi, theta, r, keep, power, noise_var)
        score2, keep2, phi2, theta2, r2, logits2 = self.decode(self.heatmap(feats, amp), need)
        if count is None and self.cfg.detector_round_picks == "network+likelihood":
            # the likelihood pick given the kept fit, first among the new candidates, scored at the threshold (log-odds 0)
            _, lp, lt, lr, _, gain = likeliest_source(self.system, self.grid, *atoms, y, phi, theta, r, power * _h_mean_square(H),
                                                      noise_var, keep, with_gain=True)
            pays = gain > ROUND_PICK_GATE * 4 * mdl_penalty(self.system)  # it would pay for itself, with a margin, unrefined
            first = lambda u, v: torch.cat([v[:, None].to(u.dtype), u[:, :-1]], 1)  # noqa: E731
            phi2, theta2, r2 = first(phi2, lp), first(theta2, lt), first(r2, lr)
            score2 = first(score2, torch.full_like(score2[:, 0], self.cfg.detector_threshold + 1e-6))
            keep2 = first(keep2, pays)
            logits2 = torch.cat([torch.zeros_like(logits2[:, :1]), logits2[:, :-1]], 1)
        gain = lambda k: torch.diff(k, dim=1, prepend=torch.zeros_like(k[:, :1]))  # noqa: E731
        cat = lambda u, v: torch.cat([u, v], 1)  # noqa: E731
        both = cat(keep, keep2 if count is not None else keep2 & (score2 > self.cfg.detector_threshold))
        order = torch.argsort((~both).to(torch.int8), dim=1, stable=True)[:, : self.K_max]
        take = lambda u, v: cat(u, v).gather(1, order)  # noqa: E731
        score, phi, theta, r = (take(u, v) for u, v in ((score, score2), (phi, phi2), (theta, theta2), (r, r2)))
        keep = both.gather(1, order)
        k_logits = take(gain(k_logits), gain(logits2)).cumsum(1)
        rphi, rtheta, rr, power, noise_var = ml_refine(y, H, codes, self.system, phi, theta, r, keep, self.cfg.refine_iters)
        phi, theta, r = (torch.where(keep, u.float(), v) for u, v in ((rphi, phi), (rtheta, theta), (rr, r)))
        pruned = self.prune(H, codes, score, keep, phi, theta, r, power, noise_var, k_logits, counted=count is not None)
        return (*pruned[:6], noise_var, pruned[6])

    # -- the whole model --------------------------------------------------------------------------
    def forward(self, y: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, R_samp: torch.Tensor | None = None,
                amp: bool = False, prior: torch.Tensor | None = None, fits=None, count: torch.Tensor | None = None) -> ModelOutput:
        """y [B,L,M], H [B,M,N], codes [B,L,N] complex64 -> :class:`ModelOutput` with A [B,N,K_max] (columns
        sqrt(N p_k / sum p) a_k: R_pred trace-normalised to N, for the covariance pipeline; the slots beyond the count
        hold the next peaks at :data:`PAD_SHARE` of the trace), k_logits, angles [B,K_max,3]
        (phi, theta rad, r m; padded slots hold the unkept peaks), ``detection`` (:class:`Detection`) and ``sources``
        (:class:`Sources`, powers in mW). prior: the feature maps of these scenes when already computed
        (:func:`detector_features`, from :meth:`workbench.forward.RsampCache.prior_of`; used as given); None: computed
        now from y, H and the codes. R_samp and fits are accepted for the common call and ignored. count: [B] int64
        given counts in 1..K_max (oracle knowledge: the true K, for the RMSE peers report with K given), None: the
        localiser counts (the default, and the only mode the tables call "no oracle").
        Evaluation mode refines the detections (``model.refine_iters``); training mode and :meth:`validation` do not
        (the locations stay differentiable in the offsets)."""
        infer = not self.training and not self._validating  # refine only at inference
        rounds = infer and self.cfg.refine_iters > 0 and self.cfg.detector_rounds > 1
        atoms = detector_atoms(self.system, self.grid, H, codes) if rounds else None
        det = self.heatmap(self.features(y, H, codes, atoms) if prior is None else prior, amp)
        if count is not None:
            count = count.to(device=y.device, dtype=torch.int64)
            if count.shape != (len(y),) or bool(((count < 1) | (count > self.K_max)).any()):
                raise ConfigError(f"count: expected [{len(y)}] integers in 1..K_max = {self.K_max}, got {tuple(count.shape)} "
                                  f"with values {count.tolist()[:8]}")
        iters = self.cfg.refine_iters if infer else 0
        score, keep, phi, theta, r, k_logits = self.decode(det, count if iters == 0 else None)
        with torch.no_grad():
            rphi, rtheta, rr, power, noise_var = ml_refine(y, H, codes, self.system, phi.detach(), theta.detach(), r.detach(), keep, iters)
        if iters > 0:
            phi, theta, r = (torch.where(keep, a.float(), b) for a, b in ((rphi, phi), (rtheta, theta), (rr, r)))
            score, keep, phi, theta, r, power, k_logits = self.prune(H, codes, score, keep, phi, theta, r, power, noise_var, k_logits)
            for _ in range(self.cfg.detector_rounds - 1):
                score, keep, phi, theta, r, power, noise_var, k_logits = self.next_round(
                    y, H, codes, amp, score, keep, phi, theta, r, power, noise_var, k_logits, atoms)
            if count is None and self.cfg.detector_relax > 0:  # before the count: the nested refits start from the moved set
                phi, theta, r, power, noise_var, _ = self.relax(y, H, codes, amp, atoms, keep, phi, theta, r)
            if count is None and self.cfg.detector_count == "mdl":
                score, keep, phi, theta, r, power, noise_var, k_logits = self.mdl_count(y, H, codes, score, keep, phi, theta, r, k_logits)
            if count is not None:  # the given count: rounds that add the residual's strongest peaks, then the strongest K
                for _ in range(self.cfg.detector_rounds):
                    if bool((keep.sum(1) >= count).all()):
                        break
                    if atoms is None:
                        atoms = detector_atoms(self.system, self.grid, H, codes)
                    score, keep, phi, theta, r, power, noise_var, k_logits = self.next_round(
                        y, H, codes, amp, score, keep, phi, theta, r, power, noise_var, k_logits, atoms, count)
                score, keep, phi, theta, r, power, k_logits = self.strongest(H, codes, count, score, keep, phi, theta, r, power,
                                                                             noise_var, k_logits)
                if self.cfg.detector_relax > 0:  # the given count's set
                    phi, theta, r, power, noise_var, _ = self.relax(y, H, codes, amp, atoms, keep, phi, theta, r)
        power = power.float()
        a = steering(self.system, phi, theta, r)  # [B,K_max,N] complex64, exact model
        share = power / power.sum(1, keepdim=True).clamp_min(1e-30)
        w = torch.where(keep, (self.N * share).clamp_min(1e-20).sqrt(), torch.full_like(share, math.sqrt(self.N * PAD_SHARE)))
        A = (a * w[..., None].to(a.dtype)).mT
        src = Sources(K=keep.sum(1), phi=phi.detach(), theta=theta.detach(), r=r.detach(), power=power * keep, mask=keep,
                      score=score.detach(), noise_var=noise_var.float())
        return ModelOutput(A=A, k_logits=k_logits, angles=torch.stack([phi, theta, r], -1), detection=det, sources=src)
