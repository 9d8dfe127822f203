"""Experiment tracking: TensorBoard event files and Weights & Biases.

The figures are exactly those of ``RUN_DIR/metrics.jsonl`` (one record per scored model,
see :func:`cycleqd.engine.loop._record`), flattened to scalar tags:

==============================  ===========================================================
tag                             value
==============================  ===========================================================
``archive/<q>/coverage``        fraction of cells filled in the archive with quality ``q``
``archive/<q>/qd_score``        sum of the elites' qualities
``archive/<q>/best_quality``    best quality in that archive
``archive/<q>/num_elites``      number of elites
``child/<skill>``               the generation's child score on each skill
``child/entered``               number of archives the child entered
``timings/<phase>``             seconds per phase (crossover, mutation, eval_<skill>, ...)
``wall_s``                      seconds since the run (process) started
``seed/<model>/<skill>``        seed models' scores (step 0)
``aggregate/<skill>``           the aggregated model's scores (step = generations + 1)
==============================  ===========================================================

plus the final elite maps (``maps/archive_<q>.png``, ``maps/elite_maps.png``) as images.
The step is the generation. TensorBoard writes to ``RUN_DIR/tensorboard`` (through
``torch.utils.tensorboard``, which needs the ``tensorboard`` package:
``pip install cycleqd[tensorboard]``); W&B (``pip install cycleqd[wandb]``) writes its run
under ``RUN_DIR/wandb`` and keeps the W&B run id in ``RUN_DIR/tracking.json`` so that
``cycleqd resume`` continues the same W&B run. ``mode: offline`` (or ``WANDB_MODE=offline``)
needs no network; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later.

A tracking failure never stops a run: the first error of a backend is printed once as a
warning and that backend is switched off (the metrics file stays the record).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping


def flatten_record(rec: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """One ``metrics.jsonl`` record -> (step, {tag: value}).

    Seed records (generation 0) give ``seed/<child>/<skill>``; the aggregate record
    (``kind: aggregate``) gives ``aggregate/<skill>``; a generation's record gives
    ``child/<skill>``. Every record gives the archive statistics and timings.
    """
    step = int(rec.get("generation", 0))
    out: dict[str, float] = {}
    scores = rec.get("scores") or {}
    if rec.get("kind") == "aggregate":
        prefix = "aggregate"
    elif step == 0:
        prefix = f"seed/{rec.get('child')}"
    else:
        prefix = "child"
        out["child/entered"] = float(len(rec.get("entered") or ()))
    for skill, v in scores.items():
        if isinstance(v, (int, float)):
            out[f"{prefix}/{skill}"] = float(v)
    for name, st in (rec.get("archives") or {}).items():
        for key, v in st.items():
            if isinstance(v, (int, float)):
                out[f"archive/{name}/{key}"] = float(v)
    for k, v in (rec.get("timings") or {}).items():
        if isinstance(v, (int, float)):
            out[f"timings/{k}"] = float(v)
    if isinstance(rec.get("wall_s"), (int, float)):
        out["wall_s"] = float(rec["wall_s"])
    return step, out


class Tracker:
    """Fan-out of metrics records and map images to the configured backends.

    Args:
        run_dir: the run directory (event files and W&B files go under it).
        tensorboard: write TensorBoard event files to ``run_dir/tensorboard``.
        wandb: ``{"project": ..., "mode": ..., "entity": ...}`` or None.
        config: the run's config (a JSON-able dict) recorded by W&B.
        name: run name shown by W&B.
    Raises:
        ImportError: a requested backend's package is missing (one line naming the extra),
            (:func:`check_available` checks the same before any model is built).
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False,
                 wandb: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                 name: str | None = None):
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        self._wandb_run = None
        self._step = 0   # highest step logged (W&B refuses steps that go back)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("tracking.tensorboard needs the tensorboard package: "
                                  "pip install 'cycleqd[tensorboard]'") from None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if wandb is not None:
            try:
                import wandb as wandb_mod
            except ImportError:
                raise ImportError("tracking.wandb needs the wandb package: pip install 'cycleqd[wandb]'") from None
            self._wandb = wandb_mod
            meta = self.run_dir / "tracking.json"
            known = json.loads(meta.read_text()) if meta.is_file() else {}
            kwargs = {k: v for k, v in dict(wandb).items() if v is not None and k in ("project", "mode", "entity")}
            self._wandb_run = wandb_mod.init(dir=str(self.run_dir), config=dict(config or {}), name=name,
                                             id=known.get("wandb_id"), resume="allow", **kwargs)
            if self._wandb_run is not None and getattr(self._wandb_run, "id", None):
                meta.write_text(json.dumps({"wandb_id": self._wandb_run.id}))

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb_run is not None

    def _fail(self, backend: str, e: BaseException) -> None:
        print(f"warning: {backend} logging failed ({type(e).__name__}: {e}); switched off, "
              f"metrics.jsonl is unaffected", file=sys.stderr)
        if backend == "tensorboard":
            self._tb = None
        else:
            self._wandb_run = None

    def log_record(self, rec: Mapping[str, Any]) -> None:
        """Log one ``metrics.jsonl`` record (see :func:`flatten_record`)."""
        step, values = flatten_record(rec)
        self._step = max(self._step, step)
        if self._tb is not None:
            try:
                for tag, v in values.items():
                    self._tb.add_scalar(tag, v, global_step=step)
            except Exception as e:  # noqa: BLE001 - logging must not end the run
                self._fail("tensorboard", e)
        if self._wandb_run is not None:
            try:
                self._wandb_run.log(values, step=step)
            except Exception as e:  # noqa: BLE001
                self._fail("wandb", e)

    def log_images(self, paths: Iterable[str | Path], step: int) -> None:
        """Log PNG files (the elite maps) as images tagged ``maps/<file stem>`` at ``step``
        (or the highest step logged so far, if that is later)."""
        step = max(step, self._step)
        paths = [Path(p) for p in paths if Path(p).is_file()]
        if self._tb is not None and paths:
            try:
                import matplotlib.image as mpimg

                for p in paths:
                    img = mpimg.imread(str(p))          # (H, W, 3|4) float32 in [0, 1]
                    self._tb.add_image(f"maps/{p.stem}", img[..., :3], global_step=step, dataformats="HWC")
            except Exception as e:  # noqa: BLE001
                self._fail("tensorboard", e)
        if self._wandb_run is not None and paths:
            try:
                self._wandb_run.log({f"maps/{p.stem}": self._wandb.Image(str(p)) for p in paths}, step=step)
            except Exception as e:  # noqa: BLE001
                self._fail("wandb", e)

    def close(self) -> None:
        """Flush and close every backend (idempotent)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def make_tracker(cfg, run_dir: str | Path) -> Tracker | None:
    """The tracker a :class:`cycleqd.config.RunConfig` asks for (``cfg.tracking``), or None."""
    t = getattr(cfg, "tracking", None)
    if t is None or (not t.tensorboard and t.wandb is None):
        return None
    return Tracker(run_dir, tensorboard=t.tensorboard,
                   wandb=t.wandb.model_dump() if t.wandb is not None else None,
                   config=cfg.model_dump(mode="json"), name=cfg.name)


def check_available(cfg) -> None:
    """Raise ImportError (one line naming the extra to install) when ``cfg.tracking`` asks
    for a backend whose package is missing; cheap (no import), so ``cycleqd run`` calls it
    before any model is built."""
    import importlib.util

    t = getattr(cfg, "tracking", None)
    if t is None:
        return
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError("tracking.tensorboard needs the tensorboard package: "
                          "pip install 'cycleqd[tensorboard]'")
    if t.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise ImportError("tracking.wandb needs the wandb package: pip install 'cycleqd[wandb]'")
