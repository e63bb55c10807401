"""The training loop, its history, checkpoints, and the seed note's four checks (``verify``).

Every batch is a step. The learning-rate schedule is stepped at the granularity it is defined with
(``cosine_per_step``: every batch; ``step_per_epoch``: every epoch). Gradients are clipped. A step whose
gradient is non-finite is skipped, counted and its NaN provenance recorded; a mixed-precision scaler's
own skipped steps (float16 overflow on CUDA) are counted separately as ``skipped_scaler``, not as NaN.
No non-finite value is ever written into the weights: a step that would do so is rolled back.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ConfigError, ExperimentConfig, preset, resolve_device
from .covariance import nmse, rsamp_for
from .diagnostics import group_norms, provenance
from .io import atomic_torch_save, atomic_write_json
from .losses import TERMS, compute_losses, term_weights
from .model import CovarianceNet, build_model
from .physics import SceneBatch, simulate

VAL_SEED_OFFSET = 1_000_003


@dataclass
class TrainResult:
    history: list[dict]
    provenance: list[dict]
    model: CovarianceNet
    config: ExperimentConfig
    extra: dict = field(default_factory=dict)


class TrainingData:
    """The scenes of a training run (``train``, ``val``: SceneBatch) and the R_samp of each, computed once per
    (estimator, Fix 1) and kept here, so that runs on the same data (sweep trials, the presets of a
    comparison) share it. ``key`` says what the scenes depend on (system, sizes, seed, device)."""

    def __init__(self, train: SceneBatch, val: SceneBatch, key: str = ""):
        self.train, self.val, self.key = train, val, key
        self._rsamp: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def key_of(cfg: ExperimentConfig) -> str:
        t = cfg.train
        return json.dumps([cfg.system.to_dict(), t.n_train, t.n_val, t.seed, t.device], sort_keys=True)

    @classmethod
    def simulate(cls, cfg: ExperimentConfig, device="cpu") -> TrainingData:
        """Training and validation scenes, seeded from ``cfg.train.seed`` (disjoint seeds)."""
        t = cfg.train
        return cls(simulate(cfg.system, t.n_train, seed=t.seed, device=device),
                   simulate(cfg.system, t.n_val, seed=t.seed + VAL_SEED_OFFSET, device=device), cls.key_of(cfg))

    def to(self, device) -> TrainingData:
        """The same data on ``device`` (self when it is already there); the R_samp cache moves along."""
        train, val = self.train.to(device), self.val.to(device)
        if train is self.train and val is self.val:
            return self
        moved = TrainingData(train, val, self.key)
        moved._rsamp = {k: v.to(device) for k, v in self._rsamp.items()}
        return moved

    @torch.no_grad()
    def rsamp(self, split: str, cfg: ExperimentConfig, chunk: int = 256) -> torch.Tensor:
        """R_samp [n,N,N] of the ``split`` ("train" | "val") scenes under ``cfg.fixes``, computed in chunks once."""
        key = (split, cfg.fixes.rsamp_estimator, cfg.fixes.rsamp_normalise, cfg.system.to_json())
        if key not in self._rsamp:
            data = getattr(self, split)
            self._rsamp[key] = torch.cat([rsamp_for(data[s:s + chunk], cfg.fixes, cfg.system) for s in range(0, len(data), chunk)])
        return self._rsamp[key]


def _schedule(opt, cfg: ExperimentConfig, steps_per_epoch: int):
    t = cfg.train
    if t.schedule == "cosine_per_step":
        total = max(1, t.epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))), "step"
    if t.schedule == "step_per_epoch":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7), "epoch"
    return None, None


@torch.no_grad()
def evaluate(model: CovarianceNet, data: SceneBatch, R_samp: torch.Tensor, cfg: ExperimentConfig, batch_size: int = 256) -> dict:
    """Validation: mean weighted loss, mean of every term, and the unweighted NMSE of R_pred."""
    model.eval()
    sums: dict[str, float] = {}
    nm = []
    for s in range(0, len(data), batch_size):
        b = data[s:s + batch_size]
        out = model(b.y, b.H, b.codes, R_samp=R_samp[s:s + batch_size], amp=cfg.train.amp)
        losses, cov = compute_losses(out, b, R_samp[s:s + batch_size], cfg)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(b)
        nm.append(nmse(cov.R_pred, cov.R_ref))  # unweighted: no knob enters it
    model.train()
    n = len(data)
    return {"val_loss": sums["total"] / n, "val_terms": {k: v / n for k, v in sums.items() if k != "total"},
            "val_nmse": float(torch.cat(nm).mean())}


def fit(cfg: ExperimentConfig, data: TrainingData | None = None, on_epoch: Callable[[dict], bool | None] | None = None,
        progress: bool = True, model: CovarianceNet | None = None) -> TrainResult:
    """Train under ``cfg`` on ``data`` (default: :meth:`TrainingData.simulate` of ``cfg``). ``on_epoch(record)``
    runs after every epoch; returning True stops (pruning).

    History records: epoch, train_loss, terms (epoch means), val_loss, val_terms, val_nmse (unweighted
    NMSE of R_pred), grad_norm per group (mean over applied steps), param_change (L2 norm of the
    epoch's weight change), lr, steps, skipped_nonfinite, skipped_scaler, seconds."""
    t = cfg.train
    device = resolve_device(t.device)
    data = (TrainingData.simulate(cfg, device) if data is None else data).to(device)
    train_data, val_data = data.train, data.val
    Rs_train, Rs_val = data.rsamp("train", cfg), data.rsamp("val", cfg)
    model = build_model(cfg.system, cfg.model, device, seed=t.seed) if model is None else model.to(device)
    groups = model.groups()
    params = [p for ps in groups.values() for p in ps]
    weights = term_weights(cfg)
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    n = len(train_data)
    steps_per_epoch = math.ceil(n / t.batch_size)
    sched, granularity = _schedule(opt, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=t.amp and device.type == "cuda")
    gen = torch.Generator().manual_seed(t.seed)
    history: list[dict] = []
    prov: list[dict] = []
    step = 0
    bar = tqdm(total=t.epochs * steps_per_epoch, disable=not progress, desc="train", unit="step")
    for epoch in range(t.epochs):
        t0 = time.perf_counter()
        start = [p.detach().clone() for p in params]
        term_sums = dict.fromkeys(["total", *TERMS], 0.0)
        gsum = dict.fromkeys(groups, 0.0)
        applied = skipped_nonfinite = skipped_scaler = 0
        for idx in torch.randperm(n, generator=gen).split(t.batch_size):
            idx = idx.to(device)
            b = train_data[idx]
            out = model(b.y, b.H, b.codes, R_samp=Rs_train[idx], amp=t.amp)
            losses, _ = compute_losses(out, b, Rs_train[idx], cfg)
            opt.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            scaler.unscale_(opt)
            norms = group_norms([p.grad for p in params], params, groups)
            finite = math.isfinite(float(losses["total"].detach())) and all(math.isfinite(v) for v in norms.values())
            step += 1
            bar.update()
            if not finite and scaler.is_enabled():
                scaler.step(opt)  # the scaler sees the inf, skips the step and lowers its scale
                scaler.update()
                skipped_scaler += 1
                continue
            if not finite:
                skipped_nonfinite += 1
                out = model(b.y, b.H, b.codes, R_samp=Rs_train[idx], amp=t.amp)  # recompute the graph to trace the NaN's origin
                records = provenance(compute_losses(out, b, Rs_train[idx], cfg)[0], model, weights)
                prov.extend({"epoch": epoch, "step": step, **r} for r in records or [{"term": "total", "op": "unknown", "groups": []}])
                opt.zero_grad(set_to_none=True)
                continue
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            before = [p.detach().clone() for p in params]
            scaler.step(opt)
            scaler.update()
            if not all(bool(torch.isfinite(p).all()) for p in params):  # never keep a non-finite weight
                with torch.no_grad():
                    for p, old in zip(params, before):
                        p.copy_(old)
                skipped_nonfinite += 1
                prov.append({"epoch": epoch, "step": step, "term": "total", "op": "optimizer_step", "groups": list(groups)})
                continue
            applied += 1
            for k in term_sums:
                term_sums[k] += float(losses[k].detach())
            for g, v in norms.items():
                gsum[g] += v
            if granularity == "step":
                sched.step()
        if granularity == "epoch":
            sched.step()
        with torch.no_grad():
            change = float(torch.stack([(p - s).abs().pow(2).sum() for p, s in zip(params, start)]).sum().sqrt())
        record = {
            "epoch": epoch,
            "train_loss": term_sums["total"] / applied if applied else float("nan"),
            "terms": {k: term_sums[k] / applied if applied else float("nan") for k in TERMS},
            **evaluate(model, val_data, Rs_val, cfg),
            "grad_norm": {g: v / applied if applied else float("nan") for g, v in gsum.items()},
            "param_change": change,
            "lr": opt.param_groups[0]["lr"],
            "steps": applied + skipped_nonfinite + skipped_scaler,
            "skipped_nonfinite": skipped_nonfinite,
            "skipped_scaler": skipped_scaler,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.4g}", val_nmse=f"{record['val_nmse']:.4g}")
        if on_epoch is not None and on_epoch(record):
            break
    bar.close()
    return TrainResult(history=history, provenance=prov, model=model, config=cfg)


# ---------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, result: TrainResult) -> Path:
    """Atomic checkpoint: weights, config (JSON) and history (JSON); loadable with weights_only=True."""
    payload = {
        "model": result.model.state_dict(),
        "config": result.config.to_json(),
        "history": json.dumps(result.history),
        "provenance": json.dumps(result.provenance),
        "format": 1,
    }
    return atomic_torch_save(path, payload)


def load_checkpoint(path: str | Path, device="cpu") -> TrainResult:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint = {str(path)!r}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        cfg = ExperimentConfig.from_json(payload["config"])
    except ConfigError:
        raise
    except Exception as e:  # truncated or foreign files raise many different errors
        raise ConfigError(f"checkpoint = {str(path)!r}: not a readable workbench checkpoint ({type(e).__name__}: {e})") from e
    model = build_model(cfg.system, cfg.model)
    model.load_state_dict(payload["model"])
    return TrainResult(history=json.loads(payload["history"]), provenance=json.loads(payload["provenance"]),
                       model=model.to(resolve_device(device) if isinstance(device, str) else device), config=cfg)


# ---------------------------------------------------------------------------------------------
LOSS_RANGE = (0.0, 1e4)  # "loss finite and in range": the seed note expected ~1e3 on its own scale


def checks(history: list[dict], provenance_records: list[dict] | None = None, loss_range=LOSS_RANGE) -> list[dict]:
    """The seed note's four checks on a training history, each {"name", "passed", "detail"}."""
    losses = [h["train_loss"] for h in history]
    finite = all(math.isfinite(x) for x in losses)
    in_range = finite and all(loss_range[0] <= x <= loss_range[1] for x in losses)
    skipped = sum(h["skipped_nonfinite"] for h in history)
    gfinite = skipped == 0 and all(math.isfinite(v) for h in history for v in h["grad_norm"].values())
    drops = [b < a for a, b in zip(losses, losses[1:])]
    decreasing = finite and len(losses) >= 2 and losses[-1] < losses[0] and sum(drops) >= len(drops) / 2
    changes = [h["param_change"] for h in history]
    ops = sorted({f"{p['term']}:{p['op']}" for p in provenance_records or []})
    return [
        {"name": "loss finite and in range", "passed": in_range,
         "detail": f"train loss per epoch {', '.join(f'{x:.4g}' for x in losses)}; range {loss_range}"},
        {"name": "gradients finite", "passed": gfinite,
         "detail": f"{skipped} non-finite steps skipped" + (f" (from {', '.join(ops)})" if ops else "")},
        {"name": "training loss decreasing", "passed": decreasing,
         "detail": f"first {losses[0]:.4g} -> last {losses[-1]:.4g}; fell in {sum(drops)}/{len(drops)} epoch steps"},
        {"name": "weights changing", "passed": bool(changes) and all(c > 0 and math.isfinite(c) for c in changes),
         "detail": "parameter change per epoch " + ", ".join(f"{c:.3g}" for c in changes)},
    ]


def verify(cfg: ExperimentConfig, progress: bool = True, **fit_kwargs) -> dict:
    """Run a short training and the seed note's four checks. Returns {"checks", "passed", "history", "provenance"}."""
    result = fit(cfg, progress=progress, **fit_kwargs)
    c = checks(result.history, result.provenance)
    return {"checks": c, "passed": all(x["passed"] for x in c), "history": result.history, "provenance": result.provenance}


def register_cli(sub) -> None:
    for name, helptext in (("train", "train a model under a preset"), ("verify", "the seed note's four checks, PASS/FAIL")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--preset", default="recommended")
        p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                       help="override a field, e.g. --set train.epochs 3 (value parsed as JSON when possible)")
        p.add_argument("--epochs", type=int)
        p.add_argument("--n-train", type=int)
        p.add_argument("--out", help="folder for history.json and checkpoint.pt" + (" (default runs/train_PRESET)" if name == "train" else ""))
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=_cli_train if name == "train" else _cli_verify)


def _cli_config(args) -> ExperimentConfig:
    from .config import parse_overrides

    overrides = parse_overrides(args.set)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.n_train is not None:
        overrides["train.n_train"] = args.n_train
    return preset(args.preset, **overrides)


def _cli_train(args) -> int:
    cfg = _cli_config(args)
    result = fit(cfg, progress=not args.no_progress)
    out = Path(args.out or f"runs/train_{args.preset}")
    atomic_write_json(out / "history.json", {"config": cfg.to_dict(), "history": result.history, "provenance": result.provenance})
    save_checkpoint(out / "checkpoint.pt", result)
    print(f"wrote {out}/history.json and {out}/checkpoint.pt; final val_nmse {result.history[-1]['val_nmse']:.4g}")
    return 0


def _cli_verify(args) -> int:
    cfg = _cli_config(args)
    report = verify(cfg, progress=not args.no_progress)
    for c in report["checks"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['detail']}")
    if args.out:
        atomic_write_json(Path(args.out) / "verify.json", report)
    return 0 if report["passed"] else 1
