"""The network: measurements (y, H, codes) -> covariance factor A, K logits and per-slot (phi, theta, r).

Tokens are the N RIS elements. Each token carries the back-projections (G_l^H y_l)_i of the L snapshots
(real and imaginary parts, 2L features), scaled per scene by the RMS of y so the raw physical units
(1e-5 and below) never reach the network, plus the element's (x, z) position. A transformer encoder
mixes the tokens (``backbone``); the ``head`` maps each token to its row of A in C^{N x K_max} and the
pooled tokens to K logits and K_max (phi, theta, r) slots.

With ``rsamp_input`` the network also sees R_samp (the pipeline's sample covariance, whatever its
estimator): each token gets its row of the factor F = V_K sqrt(Lambda_K / tr R_samp) of the K_max largest
eigenpairs, and the factor output is s F diag(g) + (learned correction), s a learned scale (initialised to sqrt(N))
and g [B,K_max] a per-scene gain of each column (softplus, initialised to 1), so training starts from the
physics-based estimate and learns how far to trust each of its components.

With ``head = "physics"`` the factor is built from source parameters instead of regressed entry by entry:
the maximum-likelihood fits of the physics baseline (:func:`workbench.ml_fit.ml_localise`, no gradient;
:class:`PhysicsFits`, computed once per batch of scenes by :meth:`workbench.forward.RsampCache.physics_fits` and passed
in as ``fits``, as the prior factor is) give k = 1..K_max sources with (phi, theta, r, p) each; the network's K logits start
from the fits' MDL scores, and for the chosen fit it learns a gain per source and a small location correction,
A[:, j] = sqrt(N g_j p_j / sum p) a(phi_j + dphi_j, theta_j + dtheta_j, r_j'), plus a learned correction of
the whole factor (scaled by a learned scalar starting at 0). At initialisation R_pred is the trace-normalised
ML covariance; training can only move it where the loss says the fit is wrong. The model then is a
measurements-only estimator whatever ``rsamp_input`` says (R_samp, when given, is one more token feature).

Mixed precision (``amp=True``) runs only the encoder under autocast (bfloat16 on CPU, float16 on CUDA);
the complex inputs, the factor and every linear-algebra step stay float32/complex64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ConfigError, ModelConfig, SystemConfig
from .covariance import low_rank_factor
from .ml_fit import SnapshotFit, ml_localise
from .physics import element_positions, steering

PHYSICS_CORRECTION = (math.radians(1.0), math.radians(1.0), 0.05)  # largest learned change of phi, theta (rad), 1/r (1/m)

REFERENCE_MODEL = ModelConfig(width=512, layers=4, heads=8, ffn_mult=7)  # about 19 M parameters, for a GPU


@dataclass
class ModelOutput:
    """A [B,N,K_max] complex64 factor (R_pred = A A^H); k_logits [B,K_max] (class j means K = j+1);
    angles [B,K_max,3] float32: phi, theta in radians and r in metres, inside the system's field of view.
    The detector head (:mod:`workbench.detector`) also gives ``detection`` (its heatmap, a
    :class:`workbench.detector.Detection`) and ``sources`` (K and every source's location and power, a
    :class:`workbench.detector.Sources`); None for the other heads."""

    A: torch.Tensor
    k_logits: torch.Tensor
    angles: torch.Tensor
    detection: Any = None
    sources: Any = None


@dataclass
class PhysicsFits:
    """The nested maximum-likelihood fits the physics head starts from, of B scenes (:attr:`SnapshotFit.levels` of an
    MDL fit, :func:`workbench.ml_fit.ml_localise` with K = None): phi, theta [B,K_max,K_max] rad, r [B,K_max,K_max] m,
    power [B,K_max,K_max] mW (row k-1: the k-source fit, slot j; zero beyond slot k-1), noise_var [B,K_max] mW and
    criterion [B,K_max] (MDL of k = 1..K_max sources), float64. Indexing (``fits[idx]``) selects scenes, as a tensor's
    first dimension does, so a training step takes its scenes' fits by index."""

    phi: torch.Tensor
    theta: torch.Tensor
    r: torch.Tensor
    power: torch.Tensor
    noise_var: torch.Tensor
    criterion: torch.Tensor

    @classmethod
    def of(cls, fit: SnapshotFit) -> PhysicsFits:
        """The fits of an MDL :class:`~workbench.ml_fit.SnapshotFit` (views of its tensors, no copy)."""
        return cls(**{n: fit.levels[n] for n in ("phi", "theta", "r", "power", "noise_var")}, criterion=fit.criterion)

    def __getitem__(self, idx) -> PhysicsFits:
        return PhysicsFits(**{n: getattr(self, n)[idx] for n in self.__dataclass_fields__})

    def __len__(self) -> int:
        return self.phi.shape[0]


class CovarianceNet(nn.Module):
    def __init__(self, system: SystemConfig, cfg: ModelConfig):
        super().__init__()
        self.system, self.cfg = system, cfg
        N, L, W, K = system.N, system.L, cfg.width, system.K_max
        x, z = element_positions(system, dtype=torch.float32)
        span = max(float(x.abs().max()), float(z.abs().max()), 1e-9)
        self.register_buffer("pos", torch.stack([x, z], -1) / span, persistent=False)  # [N,2]
        self.backbone = nn.ModuleDict(
            {
                "embed": nn.Linear(2 * L + 2 + (2 * K if cfg.rsamp_input else 0), W),
                "encoder": nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(
                        W, cfg.heads, cfg.ffn_mult * W, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
                    ),
                    cfg.layers,
                    enable_nested_tensor=False,
                ),
                "norm": nn.LayerNorm(W),
            }
        )
        self.head = nn.ModuleDict(
            {
                "factor": nn.Linear(W, 2 * K),
                "k": nn.Linear(W, K),
                "angles": nn.Linear(W, 3 * K),
            }
        )
        if cfg.rsamp_input and cfg.head == "factor":
            self.head["prior_scale"] = _Scale(math.sqrt(N))
            self.head["prior_gain"] = nn.Linear(W, K)  # per-scene trust in each column of the prior factor
            nn.init.zeros_(self.head["prior_gain"].weight)
            nn.init.constant_(self.head["prior_gain"].bias, math.log(math.e - 1))  # softplus(bias) = 1
        if cfg.head == "physics":
            self.head["slot"] = nn.Linear(W + 3, 4)  # per source: gain logit, dphi, dtheta, d(1/r)
            nn.init.zeros_(self.head["slot"].weight)
            nn.init.zeros_(self.head["slot"].bias)
            nn.init.constant_(self.head["slot"].bias[:1], math.log(math.e - 1))  # gain softplus(bias) = 1
            nn.init.zeros_(self.head["k"].weight)
            nn.init.zeros_(self.head["k"].bias)
            self.head["k_temperature"] = _Scale(1.0)  # K logits = k(pooled) - t (MDL(k) - min MDL)
            self.head["correction"] = _Scale(0.0)  # weight of the regressed factor added to the physics factor
        self.N, self.K_max = N, K

    def features(self, y: torch.Tensor, H: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Token features [B,N,2L+2] float32 from y [B,L,M], H [B,M,N], codes [B,L,N]."""
        scale = y.abs().pow(2).mean(dim=(1, 2)).clamp_min(1e-30).sqrt()  # RMS of y per scene
        h_scale = H.abs().pow(2).mean(dim=(1, 2)).clamp_min(1e-30).sqrt()
        bp = torch.einsum("bmn,bln,blm->bnl", H.conj(), codes.conj(), y)  # (G_l^H y_l)_n
        bp = bp / (scale * h_scale * math.sqrt(H.shape[1]))[:, None, None]
        pos = self.pos.expand(y.shape[0], -1, -1)
        return torch.cat([bp.real, bp.imag, pos], dim=-1).float()

    @staticmethod
    def prior_factor(R_samp: torch.Tensor, k: int) -> torch.Tensor:
        """F = V_k sqrt(lambda_k / sum lambda_k) of the k largest eigenpairs of R_samp [B,N,N], [B,N,k] complex64, no
        gradient. Each column's phase is fixed so that w^H v is real and positive for a fixed generic w: the factor is
        a function of R_samp alone, not of the eigensolver (CPU and CUDA agree). The eigenpairs come from a thin exact
        factor where R_samp has one (:func:`workbench.covariance.low_rank_factor`: rank <= k + 4, as the beamscan
        estimator's, whose eigenpairs follow from an r x r problem), else from ``torch.linalg.eigh`` of R_samp.
        Computed once per scene by :class:`workbench.forward.RsampCache` and passed to :meth:`forward` as ``prior``."""
        with torch.no_grad():
            R = 0.5 * (R_samp + R_samp.mH)
            thin = low_rank_factor(R, k)
            if thin is not None:  # R = T T^H, T [B,N,r]: T^H T = U diag(ev) U^H, eigenvectors of R: T U diag(ev)^-1/2
                ev, U = torch.linalg.eigh(thin.mH @ thin)
                if ev.shape[-1] < k:
                    pad = k - ev.shape[-1]
                    ev, U = nn.functional.pad(ev, (pad, 0)), nn.functional.pad(U, (pad, 0))
                ev, U = ev[..., -k:].clamp_min(0), U[..., -k:]
                V = (thin @ U) / ev.clamp_min(1e-30).sqrt()[..., None, :].to(U.dtype) * (ev > 0)[..., None, :]
            else:
                ev, V = torch.linalg.eigh(R)
                ev, V = ev[..., -k:].clamp_min(0), V[..., -k:]
            n = torch.arange(V.shape[-2], device=V.device, dtype=torch.float64)
            w = torch.polar(1 + n / n.numel(), 0.7 * n + 0.1 * n * n).to(V.dtype)  # a fixed generic reference vector
            lead = (w.conj()[:, None] * V).sum(-2, keepdim=True)  # [B,1,k] w^H v of each column
            V = V * (lead.conj() / lead.abs().clamp_min(1e-30))
            tr = ev.sum(-1, keepdim=True).clamp_min(1e-30)
            return (V * (ev / tr).sqrt()[..., None, :].to(V.dtype)).to(torch.complex64)

    def forward(self, y: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, R_samp: torch.Tensor | None = None,
                amp: bool = False, prior: torch.Tensor | None = None, fits: PhysicsFits | None = None) -> ModelOutput:
        """y [B,L,M], H [B,M,N], codes [B,L,N] complex64; R_samp [B,N,N] (needed with ``rsamp_input`` unless ``prior``
        is given); prior: :meth:`prior_factor` of R_samp, [B,N,K_max] complex64, when already computed (it is used
        as given, not checked against R_samp); fits: the physics head's :class:`PhysicsFits` of these B scenes, on the
        model's device, when already computed (used as given; None: :meth:`physics_fits` fits them now, every call).
        Call through :func:`workbench.forward.forward`, which passes both from the batch's cache."""
        feats = self.features(y, H, codes)
        if not self.cfg.rsamp_input:
            prior = None
        elif prior is None:
            if R_samp is None:
                raise ConfigError("R_samp: this model was built with model.rsamp_input = true and needs R_samp [B,N,N]")
            prior = self.prior_factor(R_samp, self.K_max)
        if prior is not None:
            feats = torch.cat([feats, math.sqrt(self.N) * prior.real, math.sqrt(self.N) * prior.imag], dim=-1)
        amp_dtype = torch.float16 if feats.is_cuda else torch.bfloat16
        with torch.autocast(feats.device.type, dtype=amp_dtype, enabled=amp):
            h = self.backbone["embed"](feats)
            h = self.backbone["encoder"](h)
            h = self.backbone["norm"](h)
        h = h.float()
        f = self.head["factor"](h).view(h.shape[0], self.N, 2, self.K_max)
        A = torch.complex(f[:, :, 0], f[:, :, 1]) / math.sqrt(self.K_max)  # trace(A A^H) = O(N) at init
        if self.cfg.head == "physics":
            return self._physics_head(h, A, self.physics_fits(y, H, codes) if fits is None else fits)
        if prior is not None:
            gain = nn.functional.softplus(self.head["prior_gain"](h.mean(dim=1)))  # [B,K_max]
            A = self.head["prior_scale"](prior) * gain[:, None, :] + 0.1 * A
        pooled = h.mean(dim=1)
        k_logits = self.head["k"](pooled)
        u = torch.tanh(self.head["angles"](pooled).view(-1, self.K_max, 3))
        s = self.system
        phi = u[..., 0] * math.radians(s.phi_max_deg)
        theta = u[..., 1] * math.radians(s.theta_max_deg)
        r = s.r_min_m + (u[..., 2] + 1) * 0.5 * (s.r_max_m - s.r_min_m)
        return ModelOutput(A=A, k_logits=k_logits, angles=torch.stack([phi, theta, r], -1))

    # -- the physics head -----------------------------------------------------------------------
    def physics_fits(self, y: torch.Tensor, H: torch.Tensor, codes: torch.Tensor) -> PhysicsFits:
        """The :class:`PhysicsFits` of the B scenes (y [B,L,M], H [B,M,N], codes [B,L,N]), on y's device, fitted now
        (:func:`~workbench.ml_fit.ml_localise`, no gradient, chunked by device). Nothing is kept: a caller that
        shows the same scenes again (training, validation) passes the batch's cached fits as ``fits`` instead
        (:meth:`workbench.forward.RsampCache.physics_fits`)."""
        with torch.no_grad():
            return PhysicsFits.of(ml_localise(y, H, codes, self.system))

    def _physics_head(self, h: torch.Tensor, A_corr: torch.Tensor, fits: PhysicsFits) -> ModelOutput:
        """ModelOutput of the physics head from the encoded tokens h [B,N,W], the regressed factor A_corr
        [B,N,K_max] and the ML fits (:meth:`physics_fits`)."""
        s, B, Kmax = self.system, h.shape[0], self.K_max
        pooled = h.mean(dim=1)
        crit = fits.criterion
        k_logits = self.head["k"](pooled) - self.head["k_temperature"]((crit - crit.min(1, keepdim=True).values).float())
        K = k_logits.detach().argmax(1) + 1
        level = lambda name: getattr(fits, name)[torch.arange(B, device=h.device), K - 1]  # noqa: E731  (the fit of K sources)
        phi, theta, r, p = (level(n).float() for n in ("phi", "theta", "r", "power"))
        mask = torch.arange(Kmax, device=h.device)[None, :] < K[:, None]
        share = p / p.sum(1, keepdim=True).clamp_min(1e-30)
        snr = (p / level("noise_var").float()[:, None]).clamp_min(1e-6).log() / 10
        slot_in = torch.cat([pooled[:, None, :].expand(-1, Kmax, -1), torch.stack([snr, share, mask.float()], -1)], -1)
        o = self.head["slot"](slot_in)  # [B,Kmax,4]
        gain = nn.functional.softplus(o[..., 0])
        d = torch.tanh(o[..., 1:]) * o.new_tensor(PHYSICS_CORRECTION)
        pm, tm = math.radians(s.phi_max_deg), math.radians(s.theta_max_deg)
        phi = (phi + d[..., 0]).clamp(-pm, pm)
        theta = (theta + d[..., 1]).clamp(-tm, tm)
        inv_r = (1.0 / torch.where(mask, r, torch.ones_like(r)) + d[..., 2]).clamp(1.0 / s.r_max_m, 1.0 / s.r_min_m)
        a = steering(s, phi, theta, 1.0 / inv_r)  # [B,Kmax,N] complex64
        w = torch.where(mask, (self.N * gain * share).clamp_min(1e-20).sqrt(), torch.zeros_like(gain))  # no sqrt at 0: NaN gradient
        A = (a * w[..., None].to(a.dtype)).mT + self.head["correction"](A_corr)
        top = {n: getattr(fits, n)[:, -1].float() for n in ("phi", "theta", "r")}  # unused slots: the K_max-source fit
        angles = torch.stack([torch.where(mask, phi, top["phi"]), torch.where(mask, theta, top["theta"]),
                              torch.where(mask, 1.0 / inv_r, top["r"])], -1)
        return ModelOutput(A=A, k_logits=k_logits, angles=angles)

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups, as in the seed's ``[GRAD] backbone=... head=...`` line."""
        return {"backbone": list(self.backbone.parameters()), "head": list(self.head.parameters())}


class _Scale(nn.Module):
    """Multiplication by one learned scalar."""

    def __init__(self, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def build_model(system: SystemConfig, cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0) -> CovarianceNet:
    """A seeded model on ``device`` (initialisation on the CPU so it is the same on every device): a
    :class:`CovarianceNet`, or for ``cfg.head == "detector"`` its subclass :class:`workbench.detector.LocaliserNet`."""
    cls = CovarianceNet
    if cfg.head == "detector":
        from .detector import LocaliserNet  # imports this module

        cls = LocaliserNet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(system, cfg)
    return model.to(device)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
