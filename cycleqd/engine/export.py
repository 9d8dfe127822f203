"""Export genomes / merged weights as Hugging Face folders, and streaming merges.

An exported folder holds ``config.json`` (the base's, with ``dtype`` set to the exported
weights' dtype), ``generation_config.json``, the base's tokenizer files and the weights as
safetensors (sharded with ``model.safetensors.index.json`` above ``max_shard_bytes``), with
the base checkpoint's tensor names -- so ``transformers`` (and vLLM) load it exactly like
the base. Folders are written under a temporary name and renamed at the end: an existing
export is never half-overwritten, and an existing non-empty ``out_dir`` is refused unless
``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors.torch import save_file

from cycleqd import paths
from cycleqd._io import atomic_directory
from cycleqd.engine.runview import RunView
from cycleqd.models.loading import (_TOKENIZER_FILES, check_finite, load_expert, load_model, needs_untie,
                                    non_finite_description, tied_weight_names)
from cycleqd.ops.crossover import make_crossover

DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


def _check_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another folder or "
                              "pass overwrite=True")


def write_hf_folder(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path | str,
                    source_dir: Path | str | None, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    overwrite: bool = False, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``(name, tensor)`` pairs (consumed one by one; at most one shard in RAM) plus
    the base's config, generation config and tokenizer from ``source_dir`` as an HF folder.

    Args:
        tensors: names and tensors in the dtype to store.
        out_dir: destination (created atomically).
        source_dir: HF folder of the base (config + tokenizer). ``None``: weights only.
        max_shard_bytes: shard size limit (one tensor larger than it gets its own shard).
        provenance: written to ``cycleqd_export.json``.
    Tied embeddings: when the base config ties ``lm_head`` to the input embeddings and the
    tensors include both sides with different values (an expert trained one side, e.g. a peft
    adapter with ``modules_to_save=["lm_head"]``), both are saved and the exported config
    says ``tie_word_embeddings: false`` -- with ``true`` transformers would load one side
    over the other and the model's logits would change. Equal sides stay tied.

    Returns:
        ``out_dir``.
    Raises:
        FileExistsError: ``out_dir`` is non-empty and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    pairs = _tied_pairs(Path(source_dir)) if source_dir is not None else {}
    watched = set(pairs) | set(pairs.values())
    digests: dict[str, str] = {}
    with atomic_directory(out_dir) as tmp:
        shards: list[list[str]] = []
        current: dict[str, torch.Tensor] = {}
        size = 0
        total = 0
        dtypes: dict[torch.dtype, int] = {}

        def flush():
            nonlocal current, size
            if current:
                save_file(current, str(tmp / f"shard-{len(shards):05d}.safetensors"),
                          metadata={"format": "pt"})
                shards.append(list(current))
                current, size = {}, 0

        for name, t in tensors:
            t = t.detach().contiguous()
            if name in watched:
                digests[name] = hashlib.blake2b(t.float().numpy().tobytes() + str(t.shape).encode(),
                                                digest_size=16).hexdigest()
            nb = t.numel() * t.element_size()
            if current and size + nb > max_shard_bytes:
                flush()
            current[name] = t
            size += nb
            total += nb
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel()
        flush()
        n = len(shards)
        if n == 1:
            os.replace(tmp / "shard-00000.safetensors", tmp / "model.safetensors")
        else:
            wm = {}
            for i, names in enumerate(shards):
                fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / fn)
                wm.update({k: fn for k in names})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
        dtype = max(dtypes, key=dtypes.get) if dtypes else torch.float32
        untie = any(a in digests and b in digests and digests[a] != digests[b] for a, b in pairs.items())
        if source_dir is not None:
            _copy_model_files(Path(source_dir), tmp, dtype, untie=untie)
        if provenance:
            (tmp / "cycleqd_export.json").write_text(json.dumps(dict(provenance), indent=2, default=str))
    return out_dir


def _tied_pairs(src: Path) -> dict[str, str]:
    """``{tied name: source name}`` of the model in ``src`` (``{}`` when untied / no config)."""
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        if not json.loads(cfg_path.read_text()).get("tie_word_embeddings", False):
            return {}
        from transformers import AutoConfig

        return tied_weight_names(AutoConfig.from_pretrained(str(src)))
    except Exception:  # unreadable config: _copy_model_files reports it
        return {}


def _copy_model_files(src: Path, dst: Path, dtype: torch.dtype, *, untie: bool = False) -> None:
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json to export with the weights")
    cfg = json.loads(cfg_path.read_text())
    if untie:
        cfg["tie_word_embeddings"] = False
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = src / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, dst / gen.name)
    else:
        g = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        (dst / "generation_config.json").write_text(json.dumps(g, indent=2) + "\n")
    for f in _TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)


def weights_of(space: Any, genome: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, theta) pairs of a genome, streamed when the space supports it."""
    it = getattr(space, "iter_materialized", None)
    if it is not None:
        return it(genome)
    return space.materialize(genome).items()


def export_model(space: Any, genome: Any, out_dir: Path | str, source_dir: Path | str | None, *,
                 overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 provenance: Mapping[str, Any] | None = None) -> Path:
    """Export ``theta_base + tau(genome)`` as an HF folder (see module docstring).

    Args:
        space: the run's WeightSpace (dense or SVD genomes).
        genome: any genome of ``space`` (or a dense task vector for an aggregate).
        out_dir: destination folder.
        source_dir: the base's HF folder (config, tokenizer), e.g. ``ModelInfo.model_dir``.
    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    return write_hf_folder(weights_of(space, genome), out_dir, source_dir, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes, provenance=provenance)


def stream_merge(base: str | Path, models: Sequence[str | Path], crossover: Mapping[str, Any] | str,
                 out_dir: Path | str, *, seed: int = 0, cache_dir: Path | str | None = None,
                 dtype: torch.dtype | None = None, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Merge full models / LoRA experts with a crossover operator straight to disk,
    one tensor at a time.

    Per tensor: read the base tensor and each model's tensor (memory-mapped), form the
    fp32 task vectors, merge (:meth:`TensorwiseCrossover.merge_tensor`), add to the base,
    cast to the stored dtype (or ``dtype``) and hand it to the shard writer. Peak extra
    memory: (number of models + 3) fp32 copies of the largest tensor plus one output shard
    (``max_shard_bytes``) -- for Llama-3-8B (largest tensor 128256x4096 = 2.1 GB in fp32)
    with 3 models about 13 GB + shard; use a smaller ``max_shard_bytes`` to trim it.

    Raises:
        ModelLoadError / FileNotFoundError: as :func:`cycleqd.models.loading.load_expert`
            (also for a base or model with NaN/inf/out-of-range weights).
        ValueError: bad crossover spec, or a merged tensor that is not finite in the output
            dtype (named; the output folder is not created).
    """
    cache_dir = paths.cache_dir(cache_dir)
    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    base_m = load_model(base, cache_dir=cache_dir)
    if needs_untie(base_m, models):
        base_m = load_model(base, cache_dir=cache_dir, untie=True)
    check_finite(base_m.state, f"base {base}")
    experts = [load_expert(m, base_m, cache_dir=cache_dir, label=f"model {i} ({m})")
               for i, m in enumerate(models)]
    op = make_crossover(crossover, base=base_m.state)
    g = torch.Generator().manual_seed(seed)
    state = op.prepare(len(experts), g)

    def gen():
        for name in base_m.state:
            b = base_m.state[name]
            taus = [e.task_vector[name] for e in experts]
            merged = op.merge_tensor(name, taus, state, g)
            out = (b.float() + merged).to(dtype or b.dtype)
            bad = non_finite_description(out)
            if bad is not None:
                raise ValueError(f"merged tensor {name!r} is not finite in {out.dtype} ({bad}); "
                                 f"nothing was written to {out_dir}")
            yield name, out

    return write_hf_folder(gen(), out_dir, base_m.folder, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes,
                           provenance={"merge": dict(crossover) if not isinstance(crossover, str) else crossover,
                                       "base": str(base), "models": [str(m) for m in models], "seed": seed})


# --- run directories -----------------------------------------------------------------

def _pick_model(run_dir: Path, *, model_id: str | None, cell: str | None, archive: str | None,
                aggregate: bool) -> str:
    chosen = [x for x in (model_id, cell, archive) if x] + (["aggregate"] if aggregate else [])
    if len(chosen) != 1:
        raise ValueError("export: give exactly one of model_id, cell, archive, aggregate")
    if aggregate:
        return "aggregate"
    if model_id:
        return model_id
    archives = RunView(run_dir).archives
    by_name = {a.quality_skill: a for a in archives}
    if archive:
        if archive not in by_name:
            raise ValueError(f"--archive {archive!r}: the run's archives are {sorted(by_name)}")
        best = by_name[archive].best()
        if best is None:
            raise ValueError(f"archive {archive!r} is empty")
        return best.id
    name, sep, idx = cell.partition(":")
    if not sep or name not in by_name:
        raise ValueError(f"--cell {cell!r}: expected ARCHIVE:i,j with ARCHIVE in {sorted(by_name)}")
    try:
        c = tuple(int(x) for x in idx.split(","))
    except ValueError:
        raise ValueError(f"--cell {cell!r}: cell indices must be integers like 3,7") from None
    arch = by_name[name]
    if len(c) != len(arch.axes):
        raise ValueError(f"--cell {cell!r}: archive {name!r} has {len(arch.axes)} BC axes")
    if c not in arch.elites:
        filled = sorted(arch.elites)[:10]
        raise ValueError(f"--cell {cell!r}: that cell is empty (filled cells include {filled})")
    return arch.elites[c].id


def export_from_run(run_dir: Path | str, out_dir: Path | str, *, model_id: str | None = None,
                    cell: str | None = None, archive: str | None = None, aggregate: bool = False,
                    overwrite: bool = False) -> Path:
    """Export one model of a finished (or running) CycleQD run as an HF folder.

    Exactly one of: ``model_id`` (``g000123``, ``expert:<skill>``, ``base``, ``aggregate``),
    ``cell`` (``ARCHIVE:i,j``), ``archive`` (that archive's best elite), ``aggregate``.
    The run's weight space is rebuilt from its ``config.yaml`` (same base, experts and
    operators); the genome comes from ``RUN_DIR/genomes``.

    Raises:
        ValueError: bad selection (names what exists); FileNotFoundError: missing files.
    """
    run_dir = Path(run_dir)
    mid = _pick_model(run_dir, model_id=model_id, cell=cell, archive=archive, aggregate=aggregate)
    view = RunView(run_dir)
    space, info, genome = view.space, view.model_info, view.genome(mid)
    return export_model(space, genome, out_dir, info.model_dir, overwrite=overwrite,
                        provenance={"run_dir": str(run_dir.resolve()), "model_id": mid,
                                    "base": info.base_spec, "experts": info.expert_specs,
                                    "genome": info.genome})
