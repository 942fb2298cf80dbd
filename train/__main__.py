"""`python -m magnet_engine.train codec|tokens|magnet|ar|export|all --work runs/default [--set key=value ...]
[--assets DIR]`.

Every stage resumes from its checkpoint in the work folder; `--set` overrides a field of the stage's config
dataclass (CodecTrainConfig, TokensConfig, LMTrainConfig), e.g. `--set steps=400 --set max_minutes=20`.
`export` writes the engine-format folders into WORK/export, or into `--assets DIR`: the shipped default models in
engine/assets are replaced only when that folder is named (`--assets engine/assets`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import codec as codec_stage
from . import common
from . import lm as lm_stage

STAGES = ("codec", "tokens", "magnet", "ar", "export", "all")


def _override(cfg: Any, sets: list[str]) -> Any:
    """Apply `key=value` pairs (JSON values, else strings) to the dataclass fields that exist."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    try:
        pairs = common.parse_sets(sets)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    # `all` passes one list to every stage; each takes the keys it knows
    return dataclasses.replace(cfg, **{k: v for k, v in pairs.items() if k in fields})


def _check_keys(sets: list[str], stages: list[str]) -> None:
    known: set[str] = set()
    for cls in (codec_stage.CodecTrainConfig, codec_stage.TokensConfig, lm_stage.LMTrainConfig):
        known |= {f.name for f in dataclasses.fields(cls)}
    unknown = [s.partition("=")[0] for s in sets if s.partition("=")[0] not in known]
    if unknown:
        raise SystemExit(f"unknown --set keys {unknown} for stages {stages}")


def run_stage(stage: str, work: Path, sets: list[str], assets: Path) -> None:
    t0 = time.perf_counter()
    if stage == "codec":
        cfg = _override(codec_stage.CodecTrainConfig(), sets)
        codec = codec_stage.train_codec(work, cfg)
        print(json.dumps(codec_stage.evaluate_codec(work, codec, cfg.n_valid, cfg.clip_duration)))
    elif stage == "tokens":
        codec_stage.tokenise(work, _override(codec_stage.TokensConfig(), sets))
    elif stage in ("magnet", "ar"):
        kind = "magnet" if stage == "magnet" else "musicgen"
        lm_stage.train_lm(work, _override(lm_stage.LMTrainConfig(kind=kind), sets))
    elif stage == "export":
        for kind, folder in lm_stage.export(work, assets).items():
            size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            print(f"{kind}: {folder} ({size:.1f} MiB)")
    print(f"[train] {stage} took {(time.perf_counter() - t0) / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--work", type=Path, default=Path("runs/default"), help="work folder (checkpoints, tokens)")
    p.add_argument("--assets", type=Path, default=None, help="where `export` writes the engine-format folders "
                   "(default WORK/export; name engine/assets to replace the shipped default models)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stage config field (repeatable)")
    # 1 thread by default: on a shared 2-core machine, 2 OpenMP threads were ~10x slower than 1 under load
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stages = ["codec", "tokens", "magnet", "ar", "export"] if args.stage == "all" else [args.stage]
    _check_keys(args.sets, stages)
    for stage in stages:
        run_stage(stage, args.work, args.sets, args.assets if args.assets is not None else args.work / "export")


if __name__ == "__main__":
    main()
