"""Figures of :mod:`workbench.studies.localisation` (notebook 05): RMSE against SNR beside sqrt(CRB), detection."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


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
