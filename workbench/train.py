"""The training loop, its history, resuming a run, and the seed note's four checks (``verify``).

Every batch is a step. The learning-rate schedule is stepped at the granularity it is defined with
(``cosine_per_step``: every batch; ``step_per_epoch``: every epoch). Gradients are clipped. A step whose
gradient is non-finite is skipped, counted and its NaN provenance recorded; a mixed-precision scaler's
own skipped steps (float16 overflow on CUDA) are counted separately as ``skipped_scaler``, not as NaN.
No non-finite value is ever written into the weights: a step that would do so is rolled back. Scenes with a
non-finite input (y, H, ...) or an invalid source count never reach a step: :func:`fit` refuses the data first,
naming the split and the scene index (:func:`workbench.data.check_scenes`). The scenes, their R_samp and its prior
factor come from :class:`workbench.forward.TrainingData` (computed once per scene, not per step); every step runs
:func:`workbench.forward.forward`.

With a run folder (``workbench train --out DIR``, :class:`workbench.checkpoints.RunFolder`) the whole resumable
state is written after every epoch as one unit; ``--resume DIR`` continues from it and, with the configuration
unchanged, ends exactly where an uninterrupted run would. Checkpoints are verified on load
(:mod:`workbench.checkpoints`). While :func:`fit` writes a run folder it holds the folder's lock
(:meth:`RunFolder.lock`): a second writer is refused naming the first one's PID.

Agreement before anything starts. A ``model`` given to :func:`fit` must have been built for ``cfg.system`` and
``cfg.model`` (each differing field is named). A resume must keep the run's whole configuration except the fields
in :data:`RESUME_MAY_CHANGE` (``train.epochs``: run longer or shorter; ``train.device``: where it runs): a changed
learning rate, preset (fixes, loss weights), batch size, seed, ... is refused naming each field, because the
restored optimiser, scheduler and data order would not honour it. A permitted change is applied from the resumed
epoch on and recorded in ``history.json`` under ``resumes`` (the epoch it took effect at, each field old -> new);
the per-epoch records carry the learning rate actually used.
Must not: define what is on disk (checkpoints), draw or sweep.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .checkpoints import (
    CHECKPOINT_FORMAT,
    RunFolder,
    TrainResult,
    load_weights,
)
from .config import ConfigError, ExperimentConfig, resolve_device
from .covariance import nmse
from .data import check_scenes
from .diagnostics import group_norms, provenance
from .figures import fmt
from .forward import TrainingData, forward
from .losses import TERMS, term_weights
from .model import CovarianceNet, PhysicsFits, build_model
from .physics import SceneBatch


def _schedule(opt, cfg: ExperimentConfig, steps_per_epoch: int):
    t = cfg.train
    if t.schedule == "cosine_per_step":
        total = max(1, t.epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))), "step"
    if t.schedule == "step_per_epoch":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7), "epoch"
    return None, None


@torch.no_grad()
def evaluate(model: CovarianceNet, data: SceneBatch, R_samp: torch.Tensor, cfg: ExperimentConfig, batch_size: int = 256,
             prior: torch.Tensor | None = None, fits: PhysicsFits | None = None) -> dict:
    """Validation: mean weighted loss, mean of every term, and the unweighted NMSE of R_pred. R_samp [n,N,N], its
    prior factor [n,N,K_max] (None: the model computes it) and the physics head's ML fits (None: those of each
    slice's own cache) of the ``data`` scenes (:class:`workbench.forward.RsampCache`). A model with a ``validation``
    context (the detector head, :meth:`workbench.detector.LocaliserNet.validation`) is validated inside it: its val_nmse
    is then of the unrefined R_pred."""
    model.eval()
    sums: dict[str, float] = {}
    nm = []
    with getattr(model, "validation", contextlib.nullcontext)():  # the detector head: no likelihood refinement here
        _evaluate_batches(model, data, R_samp, cfg, batch_size, prior, fits, sums, nm)
    model.train()
    n = len(data)
    return {"val_loss": sums["total"] / n, "val_terms": {k: v / n for k, v in sums.items() if k != "total"},
            "val_nmse": float(torch.cat(nm).mean())}


def _evaluate_batches(model, data, R_samp, cfg, batch_size, prior, fits, sums: dict, nm: list) -> None:
    """The batches of :func:`evaluate`: loss sums (weighted by scenes) into ``sums``, per-scene NMSE into ``nm``."""
    for s in range(0, len(data), batch_size):
        b = data[s:s + batch_size]
        _, cov, losses = forward(model, b, R_samp[s:s + batch_size], cfg, prior=None if prior is None else prior[s:s + batch_size],
                                 fits=None if fits is None else fits[s:s + batch_size], losses=True, amp=cfg.train.amp)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(b)
        nm.append(nmse(cov.R_pred, cov.R_ref))  # unweighted: no knob enters it


RESUME_MAY_CHANGE = ("train.epochs", "train.device")  # fields a resume may change (applied and recorded); any other is refused


def _config_diff(have: dict, want: dict, prefix: str = "") -> dict[str, tuple]:
    """{"section.field": (have, want)} for every field that differs between two config dicts (nested by section)."""
    out = {}
    for k in sorted(set(have) | set(want)):
        a, b = have.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_config_diff(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


def check_model_fits(model: CovarianceNet, cfg: ExperimentConfig) -> None:
    """ConfigError unless ``model`` was built for ``cfg.system`` and ``cfg.model``, naming each differing field."""
    if not isinstance(model, CovarianceNet):
        raise ConfigError(f"model: expected a CovarianceNet, got {type(model).__name__}")
    diffs = {**_config_diff(model.system.to_dict(), cfg.system.to_dict(), "system."),
             **_config_diff(model.cfg.to_dict(), cfg.model.to_dict(), "model.")}
    if diffs:
        raise ConfigError("model: built for another config than cfg ("
                          + "; ".join(f"{k}: model {a!r} != cfg {b!r}" for k, (a, b) in diffs.items())
                          + "); build it with build_model(cfg.system, cfg.model) or pass no model")


def resume_changes(saved: ExperimentConfig, cfg: ExperimentConfig, where: str) -> dict[str, list]:
    """The permitted changes of a resume, {"train.epochs": [old, new], ...}; ConfigError naming every other changed
    field (system and model fields included: the weights would not fit them)."""
    diffs = _config_diff(saved.to_dict(), cfg.to_dict())
    refused = {k: v for k, v in diffs.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        raise ConfigError(f"{where}: --resume continues a run with its own configuration, and these fields differ: "
                          + "; ".join(f"{k}: checkpoint {a!r} != requested {b!r}" for k, (a, b) in refused.items())
                          + f". Only {', '.join(RESUME_MAY_CHANGE)} may change on resume; drop the other options (--preset, "
                          "--set), or start a new run in another folder")
    return {k: [a, b] for k, (a, b) in diffs.items()}


def fit(cfg: ExperimentConfig, data: TrainingData | None = None, on_epoch: Callable[[dict], bool | None] | None = None,
        progress: bool = True, model: CovarianceNet | None = None, run_dir: str | os.PathLike | None = None,
        resume: bool = False) -> TrainResult:
    """Train under ``cfg`` on ``data`` (default: :meth:`TrainingData.simulate` of ``cfg``). ``on_epoch(record)``
    runs after every epoch; returning True stops (pruning). ``run_dir``: write the run folder (module docstring)
    after every epoch, checked for writability before anything else; ``resume``: continue the run saved there
    (its system and model config must equal ``cfg``'s). Every scene is checked first (:func:`check_scenes`).

    History records: epoch, train_loss, terms (epoch means), val_loss, val_terms, val_nmse (unweighted
    NMSE of R_pred), grad_norm per group (mean over applied steps), param_change (L2 norm of the
    epoch's weight change), lr, steps, skipped_nonfinite, skipped_scaler, step_loss (the total loss of each step in
    order, None for a step not applied), seconds."""
    run = RunFolder(run_dir) if run_dir is not None else None
    if resume and run is None:
        raise ConfigError("resume: give the run folder to resume (run_dir)")
    if model is not None:
        check_model_fits(model, cfg)
    if run is None:
        return _fit(cfg, data, on_epoch, progress, model, None, None)
    if resume:
        run.read()  # "no run to resume" before anything is created
    run.check_writable()
    with run.lock():
        saved = run.read() if resume else None  # read under the lock: the last epoch another writer completed
        return _fit(cfg, data, on_epoch, progress, model, run, saved)


def _fit(cfg: ExperimentConfig, data: TrainingData | None, on_epoch, progress: bool, model: CovarianceNet | None,
         run: RunFolder | None, saved: dict | None) -> TrainResult:
    t = cfg.train
    changes = resume_changes(ExperimentConfig.from_json(saved["config"]), cfg, f"run '{run.path}'") if saved is not None else {}
    device = resolve_device(t.device)
    data = (TrainingData.simulate(cfg, device) if data is None else data).to(device)
    check_scenes(data.train, cfg.system, "training scenes (train split)")
    check_scenes(data.val, cfg.system, "training scenes (val split)")
    Rs_train, Rs_val = data.rsamp("train", cfg, progress=progress), data.rsamp("val", cfg, progress=progress)
    prior_train, prior_val = data.prior("train", cfg), data.prior("val", cfg)  # once per scene, not once per step
    fits_train, fits_val = data.fits("train", cfg), data.fits("val", cfg)  # physics head: ML fits once per scene
    steps_per_epoch = math.ceil(len(data.train) / t.batch_size)
    loop = _Loop(cfg, device, model, steps_per_epoch)
    if saved is not None:
        loop.restore(saved, f"checkpoint '{run.checkpoint}'")
        if changes:
            loop.resumes.append({"epoch": loop.epoch, "changed": changes})
    bar = tqdm(total=max(0, t.epochs - loop.epoch) * steps_per_epoch, disable=not progress, desc="train", unit="step")
    while loop.epoch < t.epochs:
        t0 = time.perf_counter()
        record = _train_epoch(loop, cfg, data.train, Rs_train, prior_train, bar, fits_train)
        record = _ordered({**record, **evaluate(loop.model, data.val, Rs_val, cfg, prior=prior_val, fits=fits_val),
                           "seconds": time.perf_counter() - t0})
        loop.history.append(record)
        loop.epoch += 1
        if run is not None:
            run.write(loop.payload(cfg), {"config": cfg.to_dict(), "epoch": loop.epoch, "history": loop.history, "provenance": loop.prov,
                                          "resumes": loop.resumes})
        bar.set_postfix(loss=f"{record['train_loss']:.4g}", val_nmse=f"{record['val_nmse']:.4g}")
        if on_epoch is not None and on_epoch(record):
            break
    bar.close()
    return TrainResult(history=loop.history, provenance=loop.prov, model=loop.model, config=cfg)


RECORD_ORDER = ("epoch", "train_loss", "terms", "val_loss", "val_terms", "val_nmse", "grad_norm", "param_change", "lr", "steps",
                "skipped_nonfinite", "skipped_scaler", "step_loss", "seconds")


def _ordered(record: dict) -> dict:
    return {k: record[k] for k in RECORD_ORDER}


class _Loop:
    """The mutable state of a training run: everything a checkpoint holds and a resume restores."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device, model: CovarianceNet | None, steps_per_epoch: int):
        t = cfg.train
        self.device = device
        self.model = build_model(cfg.system, cfg.model, device, seed=t.seed) if model is None else model.to(device)
        self.groups = self.model.groups()
        self.params = [p for ps in self.groups.values() for p in ps]
        self.weights = term_weights(cfg)
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.sched, self.granularity = _schedule(self.opt, cfg, steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.amp and device.type == "cuda")
        self.gen = torch.Generator().manual_seed(t.seed)
        self.history: list[dict] = []
        self.prov: list[dict] = []
        self.resumes: list[dict] = []  # permitted config changes at resumes: {"epoch", "changed": {field: [old, new]}}
        self.step = 0
        self.epoch = 0  # completed epochs

    def payload(self, cfg: ExperimentConfig) -> dict:
        """The checkpoint: config, counters, weights, optimiser/scheduler/scaler states, RNG states, history."""
        rng = {"torch": torch.get_rng_state(), "permutation": self.gen.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"format": CHECKPOINT_FORMAT, "config": cfg.to_json(), "epoch": self.epoch, "step": self.step,
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None, "scaler": self.scaler.state_dict(),
                "rng": rng, "history": json.dumps(self.history), "provenance": json.dumps(self.prov),
                "resumes": json.dumps(self.resumes)}

    def restore(self, payload: dict, where: str) -> None:
        """Continue from ``payload`` (a checkpoint of this run, :func:`resume_changes` already passed)."""
        missing = [k for k in ("optimizer", "rng", "epoch", "step") if k not in payload]
        if missing:
            raise ConfigError(f"{where}: not resumable (no {', '.join(missing)}: a weights-only checkpoint)")
        load_weights(self.model, payload["model"], where)
        try:
            self.opt.load_state_dict(payload["optimizer"])
            if self.sched is not None and payload.get("scheduler") is not None:
                self.sched.load_state_dict(payload["scheduler"])
            self.scaler.load_state_dict(payload["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"{where}: the optimiser or scheduler state does not fit this run ({type(e).__name__}: {e})") from None
        torch.set_rng_state(payload["rng"]["torch"])
        self.gen.set_state(payload["rng"]["permutation"])
        if "cuda" in payload["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        self.epoch, self.step = int(payload["epoch"]), int(payload["step"])
        self.history, self.prov = json.loads(payload["history"]), json.loads(payload["provenance"])
        self.resumes = json.loads(payload.get("resumes", "[]"))


def _train_epoch(loop: _Loop, cfg: ExperimentConfig, train_data: SceneBatch, Rs_train: torch.Tensor, prior_train: torch.Tensor | None,
                 bar, fits_train: PhysicsFits | None = None) -> dict:
    """One pass over the training scenes in a seeded random order; the epoch's record without validation and time.
    Rs_train [n,N,N], prior_train [n,N,K_max] (or None) and fits_train (the physics head's ML fits, or None) are the
    scenes' R_samp, its prior factor and their fits, each taken by the step's scene indices."""
    t, params, groups = cfg.train, loop.params, loop.groups
    start = [p.detach().clone() for p in params]
    term_sums = dict.fromkeys(["total", *TERMS], 0.0)
    gsum = dict.fromkeys(groups, 0.0)
    counts = {"applied": 0, "nonfinite": 0, "scaler": 0}
    step_loss: list[float | None] = []  # the total loss of each step; None for a step not applied (JSON-safe)
    for idx in torch.randperm(len(train_data), generator=loop.gen).split(t.batch_size):
        idx = idx.to(loop.device)
        outcome, losses, norms = _train_step(loop, cfg, train_data[idx], Rs_train[idx], None if prior_train is None else prior_train[idx],
                                             None if fits_train is None else fits_train[idx])
        bar.update()
        counts[outcome] += 1
        step_loss.append(float(losses["total"].detach()) if outcome == "applied" else None)
        if outcome != "applied":
            continue
        for k in term_sums:
            term_sums[k] += float(losses[k].detach())
        for g, v in norms.items():
            gsum[g] += v
        if loop.granularity == "step":
            loop.sched.step()
    if loop.granularity == "epoch":
        loop.sched.step()
    with torch.no_grad():
        change = float(torch.stack([(p - s).abs().pow(2).sum() for p, s in zip(params, start)]).sum().sqrt())
    applied = counts["applied"]

    def mean(v: float) -> float:
        return v / applied if applied else float("nan")

    return {"epoch": loop.epoch, "train_loss": mean(term_sums["total"]), "terms": {k: mean(term_sums[k]) for k in TERMS},
            "grad_norm": {g: mean(v) for g, v in gsum.items()}, "param_change": change, "lr": loop.opt.param_groups[0]["lr"],
            "steps": sum(counts.values()), "skipped_nonfinite": counts["nonfinite"], "skipped_scaler": counts["scaler"],
            "step_loss": step_loss}


def _train_step(loop: _Loop, cfg: ExperimentConfig, b: SceneBatch, Rs: torch.Tensor, prior: torch.Tensor | None = None,
                fits: PhysicsFits | None = None) -> tuple[str, dict, dict]:
    """One optimiser step on batch ``b`` (R_samp ``Rs`` [B,N,N], its prior factor [B,N,K_max] or None, the physics
    head's ML fits of its scenes or None): ("applied" |
    "nonfinite" | "scaler", losses, gradient norms per group). A non-finite loss or gradient skips the step and
    records its provenance; a step that would write a non-finite weight is rolled back."""
    t, model, params, opt, scaler = cfg.train, loop.model, loop.params, loop.opt, loop.scaler
    losses = forward(model, b, Rs, cfg, prior=prior, fits=fits, losses=True, amp=t.amp).losses
    opt.zero_grad(set_to_none=True)
    scaler.scale(losses["total"]).backward()
    scaler.unscale_(opt)
    norms = group_norms([p.grad for p in params], params, loop.groups)
    finite = math.isfinite(float(losses["total"].detach())) and all(math.isfinite(v) for v in norms.values())
    loop.step += 1
    if not finite and scaler.is_enabled():
        scaler.step(opt)  # the scaler sees the inf, skips the step and lowers its scale
        scaler.update()
        return "scaler", losses, norms
    if not finite:
        again = forward(model, b, Rs, cfg, prior=prior, fits=fits, losses=True, amp=t.amp).losses  # recompute the graph to trace the NaN's origin
        records = provenance(again, model, loop.weights)
        loop.prov.extend({"epoch": loop.epoch, "step": loop.step, **r} for r in records or [{"term": "total", "op": "unknown", "groups": []}])
        opt.zero_grad(set_to_none=True)
        return "nonfinite", losses, norms
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    if not all(bool(torch.isfinite(p).all()) for p in params):  # never keep a non-finite weight
        with torch.no_grad():
            for p, old in zip(params, before):
                p.copy_(old)
        loop.prov.append({"epoch": loop.epoch, "step": loop.step, "term": "total", "op": "optimizer_step", "groups": list(loop.groups)})
        return "nonfinite", losses, norms
    return "applied", losses, norms


# ---------------------------------------------------------------------------------------------
LOSS_RANGE = (0.0, 1e4)  # "loss finite and in range": the seed note expected ~1e3 on its own scale


def _finite(x) -> bool:
    """A finite number (None, as strict JSON writes a non-finite one, is not)."""
    return x is not None and math.isfinite(x)


def checks(history: list[dict], provenance_records: list[dict] | None = None, loss_range=LOSS_RANGE) -> list[dict]:
    """The seed note's four checks on a training history, each {"name", "passed", "detail"}."""
    losses = [h["train_loss"] for h in history]
    finite = all(_finite(x) for x in losses)
    in_range = finite and all(loss_range[0] <= x <= loss_range[1] for x in losses)
    skipped = sum(h["skipped_nonfinite"] for h in history)
    gfinite = skipped == 0 and all(_finite(v) for h in history for v in h["grad_norm"].values())
    drops = [finite and b < a for a, b in zip(losses, losses[1:])]
    decreasing = finite and len(losses) >= 2 and losses[-1] < losses[0] and sum(drops) >= len(drops) / 2
    changes = [h["param_change"] for h in history]
    ops = sorted({f"{p['term']}:{p['op']}" for p in provenance_records or []})
    return [
        {"name": "loss finite and in range", "passed": in_range,
         "detail": f"train loss per epoch {', '.join(fmt(x, 4, show_nonfinite=True) for x in losses)}; range {loss_range}"},
        {"name": "gradients finite", "passed": gfinite,
         "detail": f"{skipped} non-finite steps skipped" + (f" (from {', '.join(ops)})" if ops else "")},
        {"name": "training loss decreasing", "passed": decreasing,
         "detail": f"first {fmt(losses[0], 4, show_nonfinite=True)} -> last {fmt(losses[-1], 4, show_nonfinite=True)}; "
                   f"fell in {sum(drops)}/{len(drops)} epoch steps"},
        {"name": "weights changing", "passed": bool(changes) and all(_finite(c) and c > 0 for c in changes),
         "detail": "parameter change per epoch " + ", ".join(fmt(c, 3, show_nonfinite=True) for c in changes)},
    ]


def verify(cfg: ExperimentConfig, progress: bool = True, **fit_kwargs) -> dict:
    """Run a short training and the seed note's four checks. Returns {"checks", "passed", "history", "provenance"}."""
    result = fit(cfg, progress=progress, **fit_kwargs)
    c = checks(result.history, result.provenance)
    return {"checks": c, "passed": all(x["passed"] for x in c), "history": result.history, "provenance": result.provenance}


@contextlib.contextmanager
def torch_threads(n: int | None, name: str = "threads"):
    """Run the block with ``n`` torch threads (None: unchanged), restoring the count after it. ``n`` < 1 raises
    ConfigError naming ``name`` (the caller's field or flag, e.g. "--threads")."""
    if n is not None and n < 1:
        raise ConfigError(f"{name} = {n}: expected an integer >= 1")
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

