"""Shared input checks on tensors: covariance batches and per-scene source counts; and the check that a registry
of implementations matches its config tuple of names.

Owns: the one definition of a valid covariance batch and of a valid source count K, with messages that
name the argument, the offending scene and the allowed values; :func:`check_registry`. Must not: convert,
repair or compute.
Configuration values (numbers, choices) are checked by :mod:`workbench.config`.
"""

from __future__ import annotations

import torch

from .config import ConfigError


def check_square(R, name: str = "R") -> None:
    """Raise ConfigError unless R is a tensor of square matrices [..., N, N] (no finiteness or symmetry check)."""
    if not isinstance(R, torch.Tensor) or R.ndim < 2 or R.shape[-1] != R.shape[-2]:
        shape = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
        raise ConfigError(f"{name}: expected a tensor of square matrices [..., N, N], got shape {shape}")


def check_covariance(R, name: str = "R", N: int | None = None, hermitian_tol: float = 1e-4, allow_single: bool = False) -> torch.Tensor:
    """Raise ConfigError unless R is a finite, Hermitian batch of square matrices [B,N,N], N >= 2.

    dtype: complex64/complex128 (real float32/float64 symmetric matrices are accepted too). ``N``: the
    required matrix size (e.g. system.N), if any. Hermitian means ||R - R^H||_F <= hermitian_tol * ||R||_F
    per scene. ``allow_single``: a single [N,N] matrix is promoted to [1,N,N]. Returns R (promoted).
    One device sync for the whole batch."""
    if not isinstance(R, torch.Tensor):
        raise ConfigError(f"{name}: expected a torch.Tensor of shape [B,N,N], got {type(R).__name__}")
    if allow_single and R.ndim == 2:
        R = R[None]
    if R.ndim != 3 or R.shape[-1] != R.shape[-2] or R.shape[-1] < 2:
        raise ConfigError(f"{name}: expected a batch of square matrices [B,N,N] with N >= 2, got shape {tuple(R.shape)}")
    if N is not None and R.shape[-1] != N:
        raise ConfigError(f"{name}: expected shape [B, {N}, {N}] (N = system.N), got {tuple(R.shape)}")
    if not (R.is_complex() or R.is_floating_point()):
        raise ConfigError(f"{name}: dtype {R.dtype} is not allowed: use complex64/complex128 (or float32/float64)")
    with torch.no_grad():
        finite = torch.isfinite(R).flatten(1).all(-1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten()[:5].tolist()
            raise ConfigError(f"{name}: non-finite entries (NaN/inf) in scene(s) {bad}: a covariance must be finite")
        scale = torch.linalg.matrix_norm(R).clamp_min(torch.finfo(R.real.dtype).tiny)
        asym = torch.linalg.matrix_norm(R - R.mH) / scale
        bad_h = asym > hermitian_tol
        if bool(bad_h.any()):
            idx = bad_h.nonzero().flatten()[:5].tolist()
            raise ConfigError(f"{name}: not Hermitian in scene(s) {idx}: ||R - R^H||/||R|| = {asym[idx[0]].item():.3g}, "
                              f"allowed <= {hermitian_tol:g} (covariance.hermitise makes one that is Hermitian up to rounding)")
    return R


def check_K(K, B: int, N: int, name: str = "K", k_min: int = 1, k_max: int | None = None) -> torch.Tensor:
    """Validate a per-scene source count and return it as int64 [B] (a scalar is broadcast).

    Allowed values k_min..k_max, with k_max defaulting to N - 1 (a subspace method needs a noise
    subspace, and the eigengap needs lambda_{K+1}). k_min is 1 for the loss terms and 0 where "no
    source" is a valid answer (a count estimated by MDL/AIC, localisation)."""
    k_max = N - 1 if k_max is None else k_max
    if not isinstance(K, torch.Tensor):
        try:
            K = torch.as_tensor(K)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(f"{name}: expected integer counts of shape [{B}], got {K!r}") from err
    if K.dtype == torch.bool or K.is_floating_point() or K.is_complex():
        raise ConfigError(f"{name}: dtype {K.dtype} is not allowed: use an integer tensor (int64) of shape [{B}]")
    if K.ndim == 0 or K.numel() == 1 and B != 1:
        K = K.reshape(()).expand(B)
    if tuple(K.shape) != (B,):
        raise ConfigError(f"{name}: shape {tuple(K.shape)} does not match the batch: expected [{B}]")
    K = K.to(torch.int64)
    bad = (K < k_min) | (K > k_max)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ConfigError(f"{name}: value {int(K[i])} in scene {i} is out of range: allowed {k_min}..{k_max} (N = {N})")
    return K.clone()


def check_registry(registry: str, names, config_name: str, config_names: tuple[str, ...]) -> None:
    """ImportError unless the registry's names equal the config tuple, in the same order. The config tuples
    (:mod:`workbench.config`, no torch code) are what a config field may hold; the registries (next to the code)
    are what runs; this keeps the two one list. The message names what is missing on each side, or the order."""
    names = tuple(names)
    if names == tuple(config_names):
        return
    only_reg = [n for n in names if n not in config_names]
    only_cfg = [n for n in config_names if n not in names]
    detail = (f"in {registry} only: {only_reg}; in {config_name} only: {only_cfg}" if only_reg or only_cfg
              else f"same names in a different order: {registry} {names} vs {config_name} {tuple(config_names)}")
    raise ImportError(f"{registry} does not match {config_name}: {detail}")
