"""Training of the vision setting's base, experts and multi-domain baseline, with a cache.

Recipe (all numbers in :class:`VisionRecipe`):

* **base**: a :class:`~cycleqd.vision.model.DigitCNN` from a seeded random init, trained with
  Adam on the *clean* train split for ``base_steps`` mini-batches.
* **experts** (one per skill domain, K = 3): fine-tuned from the base with Adam on that
  domain's train split only, ``expert_steps`` mini-batches each -- the image analogue of
  the paper's single-skill experts.
* **multi-domain fine-tune** (baseline): fine-tuned from the base on the union of the K
  domains' train splits for ``K * expert_steps`` mini-batches of the same size and learning
  rate, i.e. the same number of gradient steps and training examples as all experts together.

Mini-batches are drawn by epoch-wise permutation from a ``torch.Generator`` seeded per
model from ``(train_seed, purpose)``; training is deterministic on one machine.

The trained weights are cached under ``<cache_root>/vision/<recipe hash>/`` (safetensors,
written to a temporary folder and renamed into place), so a second demo run or the
ablation's seeds reuse them. The hash covers every recipe field and
:data:`RECIPE_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cycleqd import paths
from cycleqd.vision.data import DOMAINS, SKILL_DOMAINS, DomainSplit, build_domains
from cycleqd.vision.model import DigitCNN, accuracy

RECIPE_VERSION = 3  # bump when training code changes in a way that changes the weights


@dataclass(frozen=True)
class VisionRecipe:
    """Everything that determines the data splits and the trained base/experts.

    Attributes:
        domains: the K skill domains, in skill order (subset of ``rotated``, ``noisy``,
            ``occluded``; ``clean`` is the base's domain).
        split_seed, fractions: the image split (see :func:`cycleqd.vision.data.split_digits`).
        transform_seed, noise_std, occlusion, rotation: the domain transforms (see
            :func:`cycleqd.vision.data.transform`).
        channels, hidden: the CNN's size.
        base_steps, expert_steps: Adam steps (mini-batches) for the base / each expert.
        base_lr, expert_lr: Adam learning rates (the multi-domain fine-tune uses expert_lr).
        batch_size: images per mini-batch.
        train_seed: seeds the init and the batch order.
    """

    domains: tuple[str, ...] = SKILL_DOMAINS
    split_seed: int = 0
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
    transform_seed: int = 0
    noise_std: float = 0.35
    occlusion: int = 4
    rotation: float = 30.0
    channels: int = 16
    hidden: int = 64
    base_steps: int = 600
    expert_steps: int = 300
    base_lr: float = 1e-3
    expert_lr: float = 1e-3
    batch_size: int = 64
    train_seed: int = 0

    def __post_init__(self) -> None:
        if len(self.domains) < 2:
            raise ValueError(f"VisionRecipe.domains: CycleQD needs >= 2 skill domains, got {self.domains}")
        bad = [d for d in self.domains if d not in DOMAINS or d == "clean"]
        if bad or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"VisionRecipe.domains: choose distinct domains from "
                             f"{[d for d in DOMAINS if d != 'clean']}, got {self.domains}")
        for f in ("channels", "hidden", "base_steps", "expert_steps", "batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"VisionRecipe.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("base_lr", "expert_lr"):
            if not getattr(self, f) > 0:
                raise ValueError(f"VisionRecipe.{f} must be > 0, got {getattr(self, f)}")

    @classmethod
    def toy(cls, **overrides) -> VisionRecipe:
        """A seconds-scale recipe for CI (smaller CNN, fewer steps)."""
        kw = dict(channels=8, hidden=32, base_steps=150, expert_steps=60)
        kw.update(overrides)
        return cls(**kw)

    def to_json(self) -> dict:
        return {**asdict(self), "recipe_version": RECIPE_VERSION}

    def hash(self) -> str:
        """16-hex-digit sha256 of the recipe (the cache key)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def multidomain_steps(self) -> int:
        return self.expert_steps * len(self.domains)

    def build_data(self) -> dict[str, dict[str, DomainSplit]]:
        """``{domain: {split: DomainSplit}}`` for ``clean`` and the skill domains."""
        return build_domains(("clean",) + tuple(self.domains), split_seed=self.split_seed,
                             transform_seed=self.transform_seed, noise_std=self.noise_std,
                             occlusion=self.occlusion, rotation=self.rotation,
                             fractions=self.fractions)

    def new_model(self, generator: torch.Generator | None = None) -> DigitCNN:
        """A DigitCNN of this recipe's size (random init from ``generator``)."""
        return DigitCNN(self.channels, self.hidden, generator=generator)


def _seed(train_seed: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{train_seed}/{purpose}".encode()).digest()[:8], "little") >> 1


def train(model: torch.nn.Module, sets: Sequence[DomainSplit], *, steps: int, lr: float,
          batch_size: int, generator: torch.Generator) -> list[float]:
    """Adam on cross-entropy over the union of ``sets`` for ``steps`` mini-batches.

    Args:
        model: trained in place.
        sets: training sets (x float32 (N, 1, 8, 8), y int64 (N,)); batches are drawn from
            their union by epoch-wise random permutation.
        steps, lr, batch_size: number of Adam steps, learning rate, images per batch.
        generator: the only source of randomness (batch order).
    Returns:
        The loss of every step (float, nats).
    """
    x = torch.cat([s.x for s in sets])
    y = torch.cat([s.y for s in sets])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses: list[float] = []
    perm, pos = torch.randperm(len(y), generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > len(y):
            perm, pos = torch.randperm(len(y), generator=generator), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _clone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@dataclass
class TrainedModels:
    """The trained weights of one recipe (state dicts, float32, DigitCNN keys).

    Attributes:
        recipe: the recipe they come from.
        base: theta_base.
        experts: domain -> expert weights, in ``recipe.domains`` order.
        multidomain: the multi-domain fine-tune baseline.
        path: the cache folder they were loaded from / saved to.
        log: training log (steps, wall seconds, final losses, search accuracies).
    """

    recipe: VisionRecipe
    base: dict[str, torch.Tensor]
    experts: dict[str, dict[str, torch.Tensor]]
    multidomain: dict[str, torch.Tensor]
    path: Path
    log: dict

    def file(self, name: str) -> Path:
        """Path of ``base`` / ``expert_<domain>`` / ``multidomain`` in the cache."""
        return self.path / f"{name}.safetensors"


def train_all(recipe: VisionRecipe, data: dict[str, dict[str, DomainSplit]] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict]:
    """Train base, experts and multi-domain fine-tune from scratch (no cache).

    Returns:
        (base state dict, {domain: expert state dict}, multi-domain state dict, log).
    """
    data = data or recipe.build_data()
    log: dict = {"recipe": recipe.to_json(), "models": {}}
    model = recipe.new_model(torch.Generator().manual_seed(_seed(recipe.train_seed, "init")))
    gen = torch.Generator().manual_seed(_seed(recipe.train_seed, "base"))

    def _log(name: str, m: torch.nn.Module, losses: list[float], t0: float, steps: int) -> None:
        log["models"][name] = {
            "steps": steps, "wall_s": round(time.perf_counter() - t0, 3),
            "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5),
            "search_accuracy": {d: round(accuracy(m, data[d]["search"].x, data[d]["search"].y), 5)
                                for d in data}}

    t0 = time.perf_counter()
    losses = train(model, [data["clean"]["train"]], steps=recipe.base_steps, lr=recipe.base_lr,
                   batch_size=recipe.batch_size, generator=gen)
    _log("base", model, losses, t0, recipe.base_steps)
    base = _clone(model.state_dict())
    experts = {}
    for d in recipe.domains:
        model.load_state_dict(base)
        gen = torch.Generator().manual_seed(_seed(recipe.train_seed, f"expert/{d}"))
        t0 = time.perf_counter()
        losses = train(model, [data[d]["train"]], steps=recipe.expert_steps, lr=recipe.expert_lr,
                       batch_size=recipe.batch_size, generator=gen)
        _log(f"expert_{d}", model, losses, t0, recipe.expert_steps)
        experts[d] = _clone(model.state_dict())
    model.load_state_dict(base)
    gen = torch.Generator().manual_seed(_seed(recipe.train_seed, "multidomain"))
    t0 = time.perf_counter()
    losses = train(model, [data[d]["train"] for d in recipe.domains], steps=recipe.multidomain_steps,
                   lr=recipe.expert_lr, batch_size=recipe.batch_size, generator=gen)
    _log("multidomain", model, losses, t0, recipe.multidomain_steps)
    return base, experts, _clone(model.state_dict()), log


def get_models(recipe: VisionRecipe, *, cache_root: str | Path | None = None,
               data: dict[str, dict[str, DomainSplit]] | None = None, retrain: bool = False) -> TrainedModels:
    """Load the recipe's trained models from the cache, training them first if absent.

    Args:
        recipe: the training recipe; its :meth:`VisionRecipe.hash` is the cache key.
        cache_root: cache root (default :func:`cycleqd.paths.cache_dir`); models live under
            ``<cache_root>/vision/<hash>/``.
        data: the recipe's data if already built (saves ~1 s).
        retrain: ignore and replace a cached entry.
    Returns:
        :class:`TrainedModels`; ``log["cache_hit"]`` says whether training was skipped.
    """
    root = paths.cache_dir(cache_root)
    folder = root / "vision" / recipe.hash()
    names = ["base", "multidomain"] + [f"expert_{d}" for d in recipe.domains]
    complete = folder.is_dir() and all((folder / f"{n}.safetensors").is_file() for n in names) \
        and (folder / "train_log.json").is_file()
    if complete and not retrain:
        log = json.loads((folder / "train_log.json").read_text())
        log["cache_hit"] = True
        return TrainedModels(recipe, load_file(str(folder / "base.safetensors")),
                             {d: load_file(str(folder / f"expert_{d}.safetensors")) for d in recipe.domains},
                             load_file(str(folder / "multidomain.safetensors")), folder, log)
    base, experts, multi, log = train_all(recipe, data)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(base, str(tmp / "base.safetensors"))
    save_file(multi, str(tmp / "multidomain.safetensors"))
    for d, sd in experts.items():
        save_file(sd, str(tmp / f"expert_{d}.safetensors"))
    (tmp / "recipe.json").write_text(json.dumps(recipe.to_json(), indent=1))
    (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log["cache_hit"] = False
    return TrainedModels(recipe, base, experts, multi, folder, log)


__all__ = [
    "RECIPE_VERSION",
    "TrainedModels",
    "VisionRecipe",
    "get_models",
    "train",
    "train_all",
]
