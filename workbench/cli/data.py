"""``workbench data generate`` and ``workbench data check``: the command line of :mod:`workbench.data`.

Owns: the flags of the two actions and turning ``--config``/``--set`` into a SystemConfig (:func:`system_from_args`).
Must not: simulate, write or verify anything itself (:mod:`workbench.data` does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, ExperimentConfig, SystemConfig, parse_value
from ..data import generate, load_dataset, read_manifest


def system_from_args(config: str | None, sets: list[list[str]] | None) -> SystemConfig:
    """A SystemConfig from ``--config`` (a JSON object or a path to a JSON file: a system dict, or an
    experiment dict with a "system" section) and ``--set FIELD VALUE`` pairs (VALUE parsed by
    :func:`~workbench.config.parse_value`)."""
    data: dict[str, Any] = {}
    if config:
        text = Path(config).read_text() if not config.lstrip().startswith("{") and Path(config).is_file() else config
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config = {config!r}: not a JSON object or a JSON file ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config = {config!r}: expected a JSON object")
        if "system" in data and isinstance(data["system"], dict):
            data = ExperimentConfig.from_dict(data).system.to_dict()
    for key, value in sets or []:
        data[key.removeprefix("system.")] = parse_value(value)
    return SystemConfig.from_dict(data)


def _cmd_generate(args: argparse.Namespace) -> int:
    system = system_from_args(args.config, args.set)
    out = generate(system, args.n, args.out, seed=args.seed, force=args.force, progress=not args.quiet, chunk=args.chunk)
    print(f"wrote {out} ({args.n} scenes, seed {args.seed})")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    system = system_from_args(args.config, args.set) if (args.config or args.set) else None
    batch = load_dataset(args.path, system=system)
    m = read_manifest(args.path)
    name, info = next(iter(m["files"].items()))
    print(f"{args.path}: OK, {len(batch)} scenes, seed {m['seed']}, workbench {m.get('version')}, "
          f"created {m.get('created')}, {name} sha256 {info['sha256'][:16]}...")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    """``workbench data import FILE --out DIR`` (:func:`workbench.scenes_io.import_scenes`)."""
    from ..scenes_io import import_scenes, read_scene_file

    scenes = read_scene_file(args.file)
    out = import_scenes(args.file, args.out, force=args.force)
    s = scenes.system
    print(f"wrote {out} ({len(scenes)} scenes from {args.file}; system L {s.L}, M {s.M}, N {s.N_H}x{s.N_V}, K_max {s.K_max}); "
          f"use it with --data {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """``workbench data generate`` and ``workbench data check``."""
    p = sub.add_parser("data", help="generate and check datasets of simulated scenes on disk")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    def config_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", help="system config: a JSON object or a JSON file (system or experiment dict)")
        q.add_argument("--set", nargs=2, action="append", metavar=("FIELD", "VALUE"),
                       help="set one system field, e.g. --set L 32 --set snr_db_min 10 (repeatable)")

    g = actions.add_parser("generate", help="simulate N scenes into a dataset folder (atomic; refuses to overwrite without --force)")
    g.add_argument("--n", type=int, required=True, help="number of scenes")
    g.add_argument("--out", required=True, help="dataset folder, e.g. data/train")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--force", action="store_true", help="replace an existing dataset (only once the new one is complete)")
    g.add_argument("--chunk", type=int, default=1024, help="scenes per simulate() call")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    config_args(g)
    g.set_defaults(func=_cmd_generate)

    c = actions.add_parser("check", help="verify a dataset's checksum, tensors and (optionally) its config")
    c.add_argument("path")
    config_args(c)
    c.set_defaults(func=_cmd_check)

    i = actions.add_parser("import", help="turn a scene file of your own (.npz, .mat, .h5; docs/data-format.md) into a dataset folder")
    i.add_argument("file", help="the scene file: y, H, codes, N_H, N_V and the truth (K, phi, theta, r, power, noise_var)")
    i.add_argument("--out", required=True, help="dataset folder, e.g. data/measured")
    i.add_argument("--force", action="store_true", help="replace an existing dataset (only once the new one is complete)")
    i.set_defaults(func=_cmd_import)
