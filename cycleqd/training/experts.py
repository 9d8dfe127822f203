"""Experts on disk: LoRA adapters cached by a hash of (base, data, recipe).

``ensure_expert`` builds the skill's training conversations, hashes them together with the
base model's identity and the recipe, and returns ``<cache>/experts/<name>-<hash>/`` -- a
peft adapter folder that :func:`cycleqd.models.loading.load_expert` reads as a task vector --
training it first only if it is not there. A second demo therefore reuses every expert, and
changing anything that changes the expert (prompt format, data, split, steps, lr, base
weights) trains a new one instead of silently reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cycleqd import paths
from cycleqd.training.data import build_conversations
from cycleqd.training.sft import Conversation, LoraRecipe, conversations_digest, train_lora

#: bump when the training code changes what a given (base, data, recipe) produces
TRAIN_VERSION = "1"


def base_identity(base_dir: str | Path) -> str:
    """Identity of a base model folder for the cache key: a BLAKE2b digest of its config and
    of each weight file's size and first/last MiB (cheap; a different checkpoint differs)."""
    base_dir = Path(base_dir)
    h = hashlib.blake2b(digest_size=12)
    cfg = base_dir / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{base_dir} is not a Hugging Face model folder (no config.json)")
    h.update(cfg.read_bytes())
    files = sorted(p for p in base_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"{base_dir}: no .safetensors/.bin weights")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}|{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


@dataclass
class ExpertSpec:
    """What to train: a name (folder prefix), the skill types whose train data it sees
    (one for an expert, several for the multi-task baseline), each type's data parameters,
    and the recipe."""

    name: str
    skill_types: Sequence[str]
    data_params: Mapping[str, Mapping[str, Any]]
    recipe: LoraRecipe


def training_conversations(spec: ExpertSpec) -> list[Conversation]:
    """The union of the spec's skill types' training conversations (in type order)."""
    out: list[Conversation] = []
    for t in spec.skill_types:
        out.extend(build_conversations(t, **dict(spec.data_params.get(t, {}))))
    return out


def expert_key(base_dir: str | Path, conversations: Sequence[Conversation], recipe: LoraRecipe) -> str:
    """The cache key: hash of (training code version, base identity, data digest, recipe)."""
    blob = json.dumps({"v": TRAIN_VERSION, "base": base_identity(base_dir),
                       "data": conversations_digest(conversations), "recipe": recipe.to_json()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_expert(spec: ExpertSpec, base_dir: str | Path, *, cache_dir: str | Path | None = None,
                  force: bool = False, progress: bool = True, log=print) -> Path:
    """The adapter folder of ``spec`` over ``base_dir``, trained now if not cached.

    Args:
        spec: what to train.
        base_dir: HF folder of the base model.
        cache_dir: cache root (default :func:`cycleqd.paths.cache_dir`); adapters
            land in ``<cache_dir>/experts/<name>-<key>/``.
        force: retrain even if cached.
        progress: tqdm bar during training.
        log: where one-line status messages go (``None``: silent).
    Returns:
        The adapter folder (``adapter_config.json``, ``adapter_model.safetensors``,
        ``train_report.json``).
    Raises:
        ValueError / FileNotFoundError: bad spec, missing data or base (before training).
    """
    log = log or (lambda *_: None)
    root = paths.cache_dir(cache_dir)
    convs = training_conversations(spec)
    if not convs:
        raise ValueError(f"expert {spec.name!r}: no training conversations")
    key = expert_key(base_dir, convs, spec.recipe)
    out = root / "experts" / f"{spec.name}-{key}"
    if not force and (out / "adapter_model.safetensors").is_file() and (out / "train_report.json").is_file():
        log(f"expert {spec.name}: cached at {out}")
        return out
    log(f"expert {spec.name}: LoRA SFT on {len(convs)} conversations "
        f"({spec.recipe.steps} steps x {spec.recipe.batch_size}) -> {out}")
    t = time.time()
    rep = train_lora(base_dir, convs, spec.recipe, out, progress=progress, desc=f"train {spec.name}",
                     metadata={"name": spec.name, "skill_types": list(spec.skill_types),
                               "data_params": {k: dict(v) for k, v in spec.data_params.items()},
                               "conversations": len(convs), "key": key,
                               "base": str(base_dir)})
    first = sum(rep.losses[:3]) / max(1, len(rep.losses[:3]))
    last = sum(rep.losses[-3:]) / max(1, len(rep.losses[-3:]))
    log(f"expert {spec.name}: done in {time.time() - t:.0f} s, loss {first:.3f} -> {last:.3f}")
    return out
