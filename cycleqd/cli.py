"""The ``cycleqd`` command line.

Startup is kept light: ``cycleqd --help``, ``--version``, ``init`` and argument parsing import
neither torch nor transformers; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from cycleqd import __version__
from cycleqd.errors import ConfigError, CycleQDError

DESCRIPTION = """\
CycleQD (Kuroki et al., ICLR 2025): evolve a population of multi-skill models from
single-skill experts by quality-diversity search over their weights - no training.
One MAP-Elites archive per skill; each generation the quality skill rotates, two elites
are merged (crossover of task vectors), mutated along the expert's singular vectors,
scored on every skill, and offered to every archive.

Start here:
  cycleqd run tiny                       a one-minute run on a tiny synthetic model (CPU)
  cycleqd report RUN_DIR                 elite maps, curves and best models of a run
  cycleqd elites RUN_DIR                 every elite with its scores; the Pareto front
  cycleqd export RUN_DIR --select coding=2,db=1 OUT    the elite that fits a preference
  cycleqd demo                           SmolLM2-135M experts + CycleQD on real benchmarks
  cycleqd init my-configs                editable copies of the example configs
                                         (tiny, paper, demo, demo-toy; usable by name)
  cycleqd data list                      benchmark files: present or not, where, source
  cycleqd data fetch                     download the demo's benchmark files (checked)
"""

EPILOG = "Run `cycleqd COMMAND --help` for a command's options. Docs: README.md."


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs -> {dotted key: value text}. The text is kept as typed
    (:class:`cycleqd.config.OverrideText`): ``load_config`` parses it by the type of the field
    it sets (YAML 1.2 numbers, so ``1e-3`` is a float; verbatim text for string fields)."""
    from cycleqd.config import OverrideText

    out: dict[str, Any] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. qd.generations=10), got {p!r}")
        out[k.strip()] = OverrideText(v)
    return out


def _executor(args, ctx, cfg):
    """The executor chosen on the command line, else the config's ``executor`` section."""
    kind = getattr(args, "executor", None) or cfg.executor.type
    if kind != "ray":
        return None
    from cycleqd.engine.workers import ray_step_executor

    return ray_step_executor(ctx, address=args.address or cfg.executor.address,
                             workers=args.workers or cfg.executor.workers,
                             synchronous=args.synchronous or cfg.executor.synchronous,
                             progress=not getattr(args, "no_progress", False))


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (the current generation is committed first)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _disk_full_message(e: BaseException, run_dir: Path | None) -> str:
    path = getattr(e, "path", None) or getattr(e, "filename", None) or "a file"
    if run_dir is None:
        return f"error: disk full while writing {path}; free space and try again"
    if not (Path(run_dir) / "config.yaml").exists():
        return (f"error: disk full while writing {path}; nothing was finished yet; free space and "
                f"run the same `cycleqd run` again")
    return (f"error: disk full while writing {path}; finished generations are saved; "
            f"free space and run `cycleqd resume {run_dir}`")


def _stage(text: str) -> None:
    """One line on stderr as a stage starts (before the first generation nothing else shows)."""
    print(text, file=sys.stderr, flush=True)


def _library_progress(show: bool) -> None:
    """transformers' own bars (loading/writing local shards) only on a terminal; the hub's
    download bars always (transformers' switch also turns the hub's off, so it is turned
    back on: a multi-GB download must show that it is happening)."""
    if show:
        return
    try:
        from huggingface_hub.utils import enable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()
    enable_progress_bars()


def _require_data(skills) -> None:
    """Every benchmark file the skills read from the data dir is there (skills with their own
    ``data_path`` excepted); else one error listing all missing files and the fetch command."""
    from cycleqd.datasets import names_for_skills, require

    require(names_for_skills(skills))


def _run(cfg, run_dir: Path, *, resume: bool, args, from_snapshot: int | None = None) -> int:
    _require_data(cfg.skills)   # before any model work
    _stage("building weight space and models (importing torch, loading base and experts) ...")
    _library_progress(sys.stderr.isatty() and not args.no_progress)
    from cycleqd._io import is_disk_full
    from cycleqd.engine.build import build_components
    from cycleqd.engine.loop import CycleQDRun

    try:
        t0 = time.time()
        comps = build_components(cfg)
        _stage(f"  built in {time.time() - t0:.1f}s")
        try:
            run = CycleQDRun(cfg, comps, run_dir, resume=resume,
                             progress="lines" if args.no_progress else "auto",
                             from_snapshot=from_snapshot)
            for note in run.notes:
                print(f"note: {note}", file=sys.stderr)
            try:
                ex = _executor(args, run.ctx, cfg)
                if ex is not None:
                    run.executor = ex
                res = run.run()
            finally:
                run.close()
                run.executor.close()
        finally:
            if comps.close:
                comps.close()
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        if (run_dir / "config.yaml").is_file() and (run_dir / "state.json").is_file():
            print(f"\n{what}: finished generations are saved; continue with `cycleqd resume {run_dir}`",
                  file=sys.stderr)
        else:
            print(f"\n{what} before the run directory was created; nothing to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        if is_disk_full(e):
            print(_disk_full_message(e, run_dir), file=sys.stderr)
            return 1
        raise
    if res.complete:
        print(f"run already complete ({res.generation} generations): {res.run_dir}; nothing to do "
              f"(extend it with `cycleqd resume {res.run_dir} --generations N`)")
        return 0
    print(f"\nrun directory: {res.run_dir}  (generation {res.generation}/{cfg.qd.generations})")
    for name, st in res.stats.items():
        print(f"  archive {name:>12}: coverage {st['coverage']:.3f}  QD score {st['qd_score']:.3f}  "
              f"best {st['best_quality']:.3f}  elites {int(st['num_elites'])}")
    if res.aggregate:
        print("  aggregated model: " + "  ".join(f"{k} {v:.3f}" for k, v in res.aggregate.items()))
    print(f"next: cycleqd report {res.run_dir}")
    return 0


def _config_path(config: str) -> Path:
    """A path, or the name of a bundled example config (``tiny``, ``paper``, ...)."""
    from cycleqd import configs

    return configs.resolve(config)


def _with_tracking_flags(cfg, args):
    """``cfg`` with ``--tensorboard`` / ``--wandb`` / ``--wandb-mode`` applied (resume: the run's
    config.yaml is not changed; tracking is not part of the run's fingerprint)."""
    from cycleqd.config import TrackingConfig, WandbConfig
    from cycleqd.tracking import check_available

    t = cfg.tracking
    if args.tensorboard or args.wandb or args.wandb_mode:
        w = t.wandb
        if args.wandb or args.wandb_mode:
            w = WandbConfig(**{**(w.model_dump() if w else {}),
                               **({"project": args.wandb} if args.wandb else {}),
                               **({"mode": args.wandb_mode} if args.wandb_mode else {})})
        t = TrackingConfig(tensorboard=t.tensorboard or args.tensorboard, wandb=w)
        cfg = cfg.model_copy(update={"tracking": t})
    check_available(cfg)
    return cfg


def cmd_run(args) -> int:
    from cycleqd.config import check_config, load_config

    path = _config_path(args.config)
    _stage(f"loading config {path}")
    ov = _overrides(args.set)
    if args.generations is not None:
        ov["qd.generations"] = args.generations
    if args.seed is not None:
        ov["seed"] = args.seed
    if args.tensorboard:
        ov["tracking.tensorboard"] = True
    if args.wandb:
        ov["tracking.wandb.project"] = args.wandb
    if args.wandb_mode:
        ov["tracking.wandb.mode"] = args.wandb_mode
    cfg = load_config(path, ov)
    _require_data(cfg.skills)   # missing benchmark data: one error with the fetch command
    check_config(cfg)   # what `validate` checks, before torch or any model is loaded
    from cycleqd.tracking import check_available

    check_available(cfg)   # a missing tensorboard/wandb package: one line, before any model
    run_dir = Path(args.out or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_new_run_dir(run_dir)   # before any data or model work
    return _run(cfg, run_dir, resume=False, args=args)


def _check_new_run_dir(run_dir: Path) -> None:
    """``run --out``: absent, an empty folder, or a run directory that never got past its
    config (as :meth:`cycleqd.engine.rundir.RunDir.create` allows).

    Raises:
        RunDirError: a file, a run directory holding a run (``already holds a run``: resume
            it) or a non-empty folder that is not a run directory.
        RunLockedError: a run directory a live process is running (names its pid).
    """
    from cycleqd.engine.rundir import RunDir, RunDirError, RunLock

    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir}: is a file, not a folder; give a new or empty folder")
    if run_dir.is_dir():
        rd = RunDir(run_dir)
        if rd.state.exists() or rd.metrics.exists():   # what RunDir.create refuses, said before any build
            RunLock.acquire_for(run_dir).release()   # a live run: RunLockedError naming its pid first
            raise RunDirError(f"{run_dir} already holds a run: use `cycleqd resume {run_dir}` "
                              "or choose another --out")
        if not rd.config.exists() and any(run_dir.iterdir()):
            raise RunDirError(f"--out {run_dir}: folder is not empty and not a run directory; "
                              "give a new or empty folder")


def cmd_resume(args) -> int:
    """Resume, after checking the run directory (lock, state, metrics, genome digests)
    before any model is built; ``--from-snapshot N`` rewinds to a snapshot first,
    ``--generations N`` changes the run's length (also of a finished run)."""
    from cycleqd.config import load_config
    from cycleqd.engine.loop import build_archives, seed_ids
    from cycleqd.engine.rundir import RunLock, check_resume, check_snapshot, extend_run, finish_pending_config
    from cycleqd.engine.runview import RunView

    rd = RunView(args.run_dir).rd   # refuses a folder without config.yaml
    lock = RunLock.acquire_for(rd.root)
    try:
        finish_pending_config(rd)
        cfg = load_config(rd.config)
        expected, seeds = build_archives(cfg), seed_ids(cfg)
        snap = args.from_snapshot
        if snap is not None:
            _, why = check_snapshot(rd, snap, cfg, expected, seeds)
            if why:
                raise ValueError(f"cannot resume from snapshot {snap}: {why}")
        if args.generations is not None and args.generations != cfg.qd.generations:
            if snap is not None:
                raise ValueError("--from-snapshot and --generations: resume from the snapshot first")
            point = check_resume(rd, cfg, expected, seeds)
            if point.state is None:
                raise ValueError(f"{rd.root}: nothing committed yet; start it again with `cycleqd run`")
            new_cfg = load_config(rd.config, {"qd.generations": args.generations})
            print(extend_run(rd, point.state, new_cfg), file=sys.stderr)
            cfg = new_cfg
        elif snap is None:
            point = check_resume(rd, cfg, expected, seeds)     # refuse before building any model
            st = point.state
            if st and st["generation"] >= cfg.qd.generations and st["aggregate"] is not None:
                print(f"run already complete ({st['generation']} generations): {rd.root}; nothing to do "
                      f"(extend it with `cycleqd resume {rd.root} --generations N`)")
                return 0
        cfg = _with_tracking_flags(cfg, args)
        return _run(cfg, rd.root, resume=True, args=args, from_snapshot=snap)
    finally:
        lock.release()


def cmd_validate(args) -> int:
    """Check a run config (or a demo config: ``configs/demo.yaml``) as far as possible without
    loading any model: the schema, the benchmark data in the data dir (the same check and
    error as ``run``), the operators, local model paths, each skill's parameters (the checks
    its constructor makes), data paths and lm-eval tasks (:func:`cycleqd.config.check_config`).
    No torch import; the device is checked by ``run`` (:func:`cycleqd.engine.build.check_device`)."""
    from cycleqd.config import check_config, check_operators, check_skills, load_config, read_yaml

    path = _config_path(args.config)
    data = read_yaml(path)
    if isinstance(data, dict) and "model" not in data and {"train", "merges", "multitask"} & set(data):
        from cycleqd.config import SkillConfig
        from cycleqd.demo.config import load_demo_config

        demo = load_demo_config(path, _overrides(args.set))
        check_operators(demo)
        from cycleqd.registry import CROSSOVERS

        for op in ("task_arithmetic", "ties"):
            for point in demo.merges.grid(op):   # a list-valued parameter is a grid
                CROSSOVERS.check(op, point, field=f"merges.{op}")
        check_skills([SkillConfig(name=s.name, type=s.type, bc_range=s.bc_range, bins=s.bins, params=s.params)
                      for s in demo.skills])
        print(f"{args.config}: valid demo config ({len(demo.skills)} skills: "
              f"{', '.join(s.name for s in demo.skills)}; {demo.qd.generations} generations)")
        return 0
    cfg = load_config(path, _overrides(args.set))
    _require_data(cfg.skills)   # the same data check as `cycleqd run`, in the same order
    check_config(cfg)
    print(f"{args.config}: valid ({len(cfg.skills)} skills: {', '.join(cfg.skill_names)}; "
          f"{cfg.qd.generations} generations)")
    return 0


def cmd_init(args) -> int:
    from cycleqd import configs

    written = configs.write_examples(args.dir, overwrite=args.overwrite)
    for p in written:
        print(p)
    print(f"edit one and run it: cycleqd run {Path(args.dir) / 'tiny.yaml'}")
    return 0


def cmd_report(args) -> int:
    from cycleqd.engine.report import write_report

    paths = write_report(Path(args.run_dir), formats=args.format)
    for p in paths:
        print(p)
    return 0


def cmd_elites(args) -> int:
    from cycleqd.engine.elites import elite_table, format_text, listed

    table = elite_table(Path(args.run_dir))
    if args.json:
        rows = listed(table, front_only=args.front, sort=args.sort)
        print(json.dumps({"skills": table.skills, "elites": [r.to_json(table.skills) for r in rows]}, indent=2))
    else:
        print(format_text(table, front_only=args.front, sort=args.sort))
    return 0


def cmd_export(args) -> int:
    import shlex

    from cycleqd._io import check_out_dir
    from cycleqd.engine.elites import pick_model
    from cycleqd.engine.runview import RunView

    # the cheap checks first (OUT, the model named, the Hub target): no torch imported yet
    check_out_dir(Path(args.out_dir), args.overwrite)
    model, what = pick_model(RunView(args.run_dir), model_id=args.model, cell=args.cell,
                             archive=args.archive, aggregate=args.aggregate, select=args.select)
    from cycleqd.engine.export import HubPushError, check_hub_target, export_from_run, push_to_hub

    if args.push_to_hub:
        check_hub_target(args.push_to_hub)        # before the export's expensive work
    if args.select is not None:
        print(f"selected {what}")
    pick = (["--aggregate"] if args.aggregate else ["--cell", args.cell] if args.cell is not None else
            ["--archive", args.archive] if args.archive is not None else
            ["--select", args.select] if args.select is not None else ["--model", args.model])
    command = shlex.join(["cycleqd", "export", args.run_dir, *pick, args.out_dir]
                         + (["--dtype", args.dtype] if args.dtype else [])
                         + (["--overwrite"] if args.overwrite else []))
    out = export_from_run(Path(args.run_dir), Path(args.out_dir), model_id=model,
                          overwrite=args.overwrite, dtype=args.dtype, command=command)
    print(f"exported {what if args.select is None else model} to {out}")
    if args.push_to_hub:
        try:
            print(f"pushed to {push_to_hub(out, args.push_to_hub, private=args.private)}")
        except HubPushError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def cmd_demo(args) -> int:
    if args.domain == "vision":
        from cycleqd.vision.demo import main as vision_main

        vision_main(Path(args.out or "runs/demo-vision"), generations=args.generations, seed=args.seed or 0,
                    toy=args.toy)
        return 0
    from cycleqd.demo.llm import main as llm_main

    _library_progress(sys.stderr.isatty() and not args.no_progress)
    return llm_main(args)


def cmd_data(args) -> int:
    """``cycleqd data list``: one row per catalogue file; ``cycleqd data fetch [NAME...]``:
    download what is missing (default: what the demo needs)."""
    from cycleqd import datasets
    from cycleqd.paths import data_dir

    root = data_dir()
    if args.data_command == "fetch":
        names = args.names or list(datasets.DEFAULT_DATASETS)
        got = datasets.fetch(names, root, progress=not args.no_progress, refetch=True)
        print(f"{len(got)} file(s) fetched into {root}" if got else f"nothing to fetch: {', '.join(names)} "
              f"already in {root}")
        return 0
    rows = [("NAME", "STATUS", "SIZE", "PATH", "SOURCE")]
    for d in datasets.CATALOGUE.values():
        for f in d.files:
            src = f.url or f"mirror only: {f.mirror_only}"
            rows.append((d.name, datasets.file_status(f, root), f"{f.size / 1e6:.2f} MB", str(root / f.rel), src))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"data dir: {root} (CYCLEQD_DATA_DIR / --data-dir)" +
          (f"; mirror: {datasets.mirror()}" if datasets.mirror() else ""))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def cmd_train_expert(args) -> int:
    from cycleqd.training.cli import main as train_main

    _library_progress(sys.stderr.isatty())

    return train_main(args)


def _command_of(argv: Sequence[str] | None) -> str | None:
    """The sub-command named in ``argv`` (first word not starting with ``-``), or None."""
    argv = sys.argv[1:] if argv is None else argv
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. The ``demo`` and ``train-expert`` options come from modules that
    import torch; they are added only when ``argv`` names that command (``argv=None``:
    ``sys.argv``), so ``cycleqd --help`` and the other commands start without torch."""
    command = _command_of(argv)
    p = argparse.ArgumentParser(prog="cycleqd", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"cycleqd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_data_dir(sp):
        sp.add_argument("--data-dir", default=None, metavar="DIR",
                        help="benchmark data folder (sets $CYCLEQD_DATA_DIR; default <cache>/data)")

    def add_exec(sp):
        sp.add_argument("--executor", choices=["local", "ray"], default=None,
                        help="where children are made and scored (default: the config's executor.type)")
        sp.add_argument("--address", help="Ray cluster address HOST:PORT (default: start Ray locally)")
        sp.add_argument("--workers", type=int, default=None, help="Ray workers (default: executor.workers)")
        sp.add_argument("--synchronous", action="store_true",
                        help="Ray: one job at a time, reproducing the in-process run exactly")
        sp.add_argument("--no-progress", action="store_true",
                        help="no progress bar: one plain line per generation (also the default "
                             "when the output is not a terminal)")
        sp.add_argument("--tensorboard", action="store_true",
                        help="log metrics and maps to RUN_DIR/tensorboard (tracking.tensorboard)")
        sp.add_argument("--wandb", metavar="PROJECT", default=None,
                        help="log metrics and maps to Weights & Biases project PROJECT")
        sp.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=None,
                        help="W&B mode (offline: no network; `wandb sync` later)")

    sp = sub.add_parser("run", help="start a CycleQD run from a YAML config",
                        description="Start a CycleQD run. Every generation is checkpointed; "
                                    "`cycleqd resume RUN_DIR` continues a killed run exactly.")
    add_data_dir(sp)
    sp.add_argument("config", help="YAML config file, or the name of a bundled example "
                                   "(tiny, paper; `cycleqd init DIR` writes editable copies)")
    sp.add_argument("--out", help="run directory (default runs/NAME-TIMESTAMP)")
    sp.add_argument("--generations", type=int, help="override qd.generations")
    sp.add_argument("--seed", type=int, help="override seed")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key, e.g. --set qd.sampling=uniform")
    add_exec(sp)
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("resume", help="continue a run from its last complete generation",
                        description="Continue a run from its last complete generation. The run "
                                    "directory is checked first (state, metrics, genome digests); "
                                    "one process per run directory (RUN_DIR/.lock).")
    add_data_dir(sp)
    sp.add_argument("run_dir")
    sp.add_argument("--from-snapshot", type=int, default=None, metavar="N",
                    help="rewind to snapshot archives/gen_N.json first (when the newest state is "
                         "damaged; the later generations are redone and come out the same)")
    sp.add_argument("--generations", type=int, default=None, metavar="N",
                    help="change the run's total number of generations (extends a finished run)")
    add_exec(sp)
    sp.set_defaults(fn=cmd_resume)

    sp = sub.add_parser("validate", help="check a config without loading any model")
    add_data_dir(sp)
    sp.add_argument("config", help="YAML config file or bundled config name")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("init", help="write editable copies of the example configs into DIR",
                        description="Write the bundled example configs (tiny, paper, demo, demo-toy) "
                                    "into DIR for editing; `cycleqd run DIR/tiny.yaml` runs one.")
    sp.add_argument("dir", help="target folder (created if missing)")
    sp.add_argument("--overwrite", action="store_true", help="replace existing files of the same name")
    sp.set_defaults(fn=cmd_init)

    sp = sub.add_parser("report", help="render a run's summary (elite maps, curves, best models)")
    sp.add_argument("run_dir", help="the run directory (holds config.yaml and state.json)")
    sp.add_argument("--format", choices=["md", "html", "both"], default="both")
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("elites", help="list every elite of a run with its scores and the Pareto front")
    sp.add_argument("run_dir", help="the run directory (holds config.yaml, state.json, metrics.jsonl)")
    sp.add_argument("--front", action="store_true", help="only the Pareto front")
    sp.add_argument("--sort", metavar="SKILL", help="sort by this skill's score (or 'mean', the default)")
    sp.add_argument("--json", action="store_true", help="JSON for scripts (skills, elites with scores)")
    sp.set_defaults(fn=cmd_elites)

    sp = sub.add_parser("export", help="export an elite or the aggregated model as a Hugging Face folder")
    sp.add_argument("run_dir", help="the run directory to export from (holds config.yaml, state.json, genomes/)")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--aggregate", action="store_true", help="the aggregated model")
    g.add_argument("--cell", help="ARCHIVE:i,j - the elite in that cell of that archive")
    g.add_argument("--archive", help="the best elite of this archive (quality skill name)")
    g.add_argument("--model", help="a model id (e.g. g000123, expert:coding)")
    g.add_argument("--select", metavar="PREF",
                   help="the elite that best fits a preference: weights 'coding=2,db=1' and/or "
                        "constraints 'coding>=0.3' (see `cycleqd elites`)")
    sp.add_argument("out_dir")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace an earlier export in OUT_DIR (swapped in once the new one is complete)")
    sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"],
                    help="dtype of the saved weights (auto: the base's; default: as materialised)")
    sp.add_argument("--push-to-hub", metavar="REPO",
                    help="then upload OUT_DIR to this Hugging Face model repo (token: HF_TOKEN or `hf auth login`)")
    sp.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("demo", help="the embedded default: experts, CycleQD, comparison table")
    add_data_dir(sp)
    sp.add_argument("--domain", choices=["llm", "vision"], default="llm")
    sp.add_argument("--out", help="output directory")
    sp.add_argument("--generations", type=int, help="CycleQD generations")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--toy", action="store_true", help="toy size (tiny model, few items) for CI")
    if command == "demo":
        from cycleqd.demo.llm import add_arguments as demo_arguments

        demo_arguments(sp)
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("data", help="benchmark data: list what is present, fetch what is missing")
    dsub = sp.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    add_data_dir(dsub.add_parser("list", help="each file: present/missing, path, public source, size"))
    dp = dsub.add_parser("fetch", help="download missing files and re-fetch changed ones (pinned sources, "
                                       "SHA-256 checked, $CYCLEQD_FETCH_TIMEOUT s per read, default 30; "
                                       "$CYCLEQD_DATA_MIRROR replaces the public URLs)")
    dp.add_argument("names", nargs="*", metavar="NAME",
                    help="data sets (default: mbpp dbbench os, what the demo needs); see `cycleqd data list`")
    dp.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_data_dir(dp)
    sp.set_defaults(fn=cmd_data)

    sp = sub.add_parser("train-expert", help="fine-tune (LoRA) an expert for one skill")
    sp.add_argument("skill")
    if command == "train-expert":
        from cycleqd.training.cli import add_arguments as train_arguments

        train_arguments(sp)
    sp.set_defaults(fn=cmd_train_expert)
    return p


def _quiet_libraries() -> None:
    """Quieter transformers/tokenizers logs, without importing them (environment variables
    they read at import). Download progress bars of the hub stay on: a large model's
    download must show that it is happening."""
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()

    args = build_parser(argv).parse_args(argv)
    if getattr(args, "data_dir", None) and args.command != "train-expert":   # its --data-dir is a data_path
        os.environ["CYCLEQD_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        previous = signal.signal(signal.SIGTERM, _on_sigterm)   # like Ctrl-C: commit, then the hint
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    try:
        return int(args.fn(args) or 0)
    except CycleQDError as e:   # config, run directory, model source, missing dependency ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\n{'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:
        from cycleqd._io import is_disk_full

        if is_disk_full(e):
            print(_disk_full_message(e, getattr(args, "run_dir", None)), file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
