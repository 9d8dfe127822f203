"""Export genomes / merged weights as Hugging Face folders, and streaming merges.

An exported folder holds ``config.json`` (the base's, with ``dtype`` set to the exported
weights' dtype), ``generation_config.json``, the base's tokenizer files and the weights as
safetensors (sharded with ``model.safetensors.index.json`` above ``max_shard_bytes``), with
the base checkpoint's tensor names -- so ``transformers`` (and vLLM) load it exactly like
the base. Folders are written under a temporary name and swapped in at the end
(:func:`cycleqd._io.atomic_directory`): an existing export is never half-overwritten, and an
existing non-empty ``out_dir`` is refused unless ``overwrite=True`` -- and even then only when
it looks like a model folder (``config.json``, ``cycleqd_export.json`` or safetensors in it),
so a mistyped path never replaces an unrelated folder. Files get the modes ``save_pretrained``
gives (0666 / 0777 less the umask). ``dtype`` converts the weights on the way out (float16
refuses a weight beyond its range). :func:`export_from_run` also writes a model card
(``README.md``, :mod:`cycleqd.engine.model_card`); :func:`push_to_hub` uploads a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import save_file

from cycleqd import paths
from cycleqd._io import atomic_directory
from cycleqd.errors import CycleQDError
from cycleqd._io import check_out_dir as _check_out
from cycleqd.engine.elites import pick_model
from cycleqd.engine.model_card import model_card
from cycleqd.engine.runview import RunView
from cycleqd.models.loading import load_expert, load_model, needs_untie
from cycleqd.models.sources import _TOKENIZER_FILES
from cycleqd.models.validate import check_finite, non_finite_description, tied_weight_names
from cycleqd.ops.crossover import make_crossover

DEFAULT_SHARD_BYTES = 5 * 1024 ** 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, source_dir: Path | str | None) -> torch.dtype | None:
    """The torch dtype to export in: ``None`` keeps each tensor's dtype, a name of
    :data:`DTYPES` or a torch dtype is that dtype, ``"auto"`` is the base's (``dtype`` or
    ``torch_dtype`` of ``source_dir/config.json``, as transformers records it).

    Raises:
        ValueError: an unknown name, or ``"auto"`` without a base config that records a dtype.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype {dtype!r}: expected one of {[*DTYPES, 'auto']}")
    cfg_path = Path(source_dir) / "config.json" if source_dir is not None else None
    cfg = json.loads(cfg_path.read_text()) if cfg_path is not None and cfg_path.is_file() else {}
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if name not in DTYPES:
        raise ValueError(f"dtype 'auto': the base's config ({cfg_path}) records no float dtype "
                         f"({name!r}); choose one of {list(DTYPES)}")
    return DTYPES[name]


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype | None, out_dir: Path) -> torch.Tensor:
    """``t`` in ``dtype`` (float tensors only); ValueError naming the tensor when a value is
    beyond ``dtype``'s range (float16: 65504), checked before the cast turns it into inf."""
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    bad = non_finite_description(t, max_abs=float(torch.finfo(dtype).max))
    if bad is not None:
        raise ValueError(f"tensor {name!r} does not fit {str(dtype).removeprefix('torch.')} ({bad}); "
                         f"export as bfloat16 or float32 instead; nothing was written to {out_dir}")
    return t.to(dtype)


def write_hf_folder(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path | str,
                    source_dir: Path | str | None, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    overwrite: bool = False, provenance: Mapping[str, Any] | None = None,
                    dtype: str | torch.dtype | None = None,
                    extra_files: Mapping[str, str] | None = None) -> Path:
    """Write ``(name, tensor)`` pairs (consumed one by one; at most one shard in RAM) plus
    the base's config, generation config and tokenizer from ``source_dir`` as an HF folder.

    Args:
        tensors: names and tensors (stored in their dtype unless ``dtype`` is given).
        out_dir: destination (created atomically; replaces an earlier export with ``overwrite``).
        source_dir: HF folder of the base (config + tokenizer). ``None``: weights only.
        max_shard_bytes: shard size limit (one tensor larger than it gets its own shard).
        provenance: written to ``cycleqd_export.json``.
        dtype: float dtype of the saved weights and of config.json's ``dtype``
            (:func:`resolve_dtype`: ``float32|bfloat16|float16|auto`` or a torch dtype).
        extra_files: ``{file name: UTF-8 text}`` written into the folder (the model card).
    Tied embeddings: when the base config ties ``lm_head`` to the input embeddings and the
    tensors include both sides with different values (an expert trained one side, e.g. a peft
    adapter with ``modules_to_save=["lm_head"]``), both are saved and the exported config
    says ``tie_word_embeddings: false`` -- with ``true`` transformers would load one side
    over the other and the model's logits would change. Equal sides stay tied.

    Returns:
        ``out_dir``.
    Raises:
        FileExistsError: ``out_dir`` is a file, or non-empty and ``overwrite`` is False, or
            not a model folder.
        ValueError: bad ``dtype``; a tensor beyond its range (``out_dir`` is left as it was).
    """
    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    dtype = resolve_dtype(dtype, source_dir)
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
            t = _cast(name, t.detach(), dtype, out_dir).contiguous()
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
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
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
        shutil.copyfile(gen, dst / gen.name)       # copyfile: the umask's mode, not the source's
    else:
        g = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        (dst / "generation_config.json").write_text(json.dumps(g, indent=2) + "\n")
    for f in _TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)


def weights_of(space: Any, genome: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, theta) pairs of a genome, streamed when the space supports it."""
    it = getattr(space, "iter_materialized", None)
    if it is not None:
        return it(genome)
    return space.materialize(genome).items()


def export_model(space: Any, genome: Any, out_dir: Path | str, source_dir: Path | str | None, *,
                 overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 provenance: Mapping[str, Any] | None = None, dtype: str | torch.dtype | None = None,
                 extra_files: Mapping[str, str] | None = None) -> Path:
    """Export ``theta_base + tau(genome)`` as an HF folder (see module docstring).

    Args:
        space: the run's WeightSpace (dense or SVD genomes).
        genome: any genome of ``space`` (or a dense task vector for an aggregate).
        out_dir: destination folder.
        source_dir: the base's HF folder (config, tokenizer), e.g. ``ModelInfo.model_dir``.
        overwrite, max_shard_bytes, provenance, dtype, extra_files: see :func:`write_hf_folder`.
    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    return write_hf_folder(weights_of(space, genome), out_dir, source_dir, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes, provenance=provenance, dtype=dtype,
                           extra_files=extra_files)


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

def export_from_run(run_dir: Path | str, out_dir: Path | str, *, model_id: str | None = None,
                    cell: str | None = None, archive: str | None = None, aggregate: bool = False,
                    select: str | None = None, overwrite: bool = False, dtype: str | torch.dtype | None = None,
                    command: str | None = None) -> Path:
    """Export one model of a finished (or running) CycleQD run as an HF folder with a
    model card (``README.md``: lineage, scores, config, method; :func:`model_card`).

    Exactly one of: ``model_id`` (``g000123``, ``expert:<skill>``, ``base``, ``aggregate``),
    ``cell`` (``ARCHIVE:i,j``), ``archive`` (that archive's best elite), ``aggregate``,
    ``select`` (a preference such as ``coding=2,db>=0.3``:
    :func:`cycleqd.engine.elites.parse_preference`).
    The run's weight space is rebuilt from its ``config.yaml`` (same base, experts and
    operators); the genome comes from ``RUN_DIR/genomes``. ``dtype``: see
    :func:`write_hf_folder` (``None``: as materialised); ``command``: the command line,
    quoted in the card.

    Raises:
        ValueError: bad selection (names what exists: :func:`cycleqd.engine.elites.pick_model`),
            bad dtype, a weight beyond the dtype's range; RunDirError: a damaged run (an elite
            score that differs from ``metrics.jsonl``, a genome whose SHA-256 is not the
            recorded one); FileNotFoundError: missing files; FileExistsError: see :func:`_check_out`,
            or ``out_dir`` is (or holds) the run directory, or is the run's base or an expert.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir)
    if run_dir.resolve() == out_dir.resolve() or out_dir.resolve() in run_dir.resolve().parents:
        raise FileExistsError(f"{out_dir} is or holds the run directory {run_dir}; export elsewhere")
    _check_out(out_dir, overwrite)
    if dtype not in (None, "auto") and not isinstance(dtype, torch.dtype):
        resolve_dtype(dtype, None)
    view = RunView(run_dir)
    mid, _ = pick_model(view, model_id=model_id, cell=cell, archive=archive, aggregate=aggregate,
                        select=select)      # checked before the weight space is built
    space, info = view.space, view.model_info
    sources = [info.model_dir, info.base_spec, *info.expert_specs]
    if any(Path(str(s)).expanduser().resolve() == out_dir.resolve() for s in sources if s):
        raise FileExistsError(f"{out_dir} is a model the run reads (its base or an expert); export elsewhere")
    dt = resolve_dtype(dtype, info.model_dir)
    genome = view.genome(mid)
    card = model_card(run_dir, mid, base=info.base_spec, experts=info.expert_specs,
                      base_dir=info.model_dir, dtype=None if dt is None else str(dt).removeprefix("torch."),
                      command=command)
    return export_model(space, genome, out_dir, info.model_dir, overwrite=overwrite, dtype=dt,
                        extra_files={"README.md": card},
                        provenance={"run_dir": str(run_dir.resolve()), "model_id": mid,
                                    "base": info.base_spec, "experts": info.expert_specs,
                                    "genome": info.genome})


class HubPushError(CycleQDError, RuntimeError):
    """The Hub refused an upload or could not be reached; the message is one line naming
    the repository, the Hub's answer and the complete local folder to retry from."""


# the Hub client's errors: its own HTTP error and the transport's base class (httpx or
# requests, by huggingface_hub version) -- connection refused, timeouts, TLS
_HUB_ERRORS = (HfHubHTTPError, *HfHubHTTPError.__bases__)


def push_to_hub(folder: Path | str, repo_id: str, *, private: bool = False, token: str | None = None,
                endpoint: str | None = None, commit_message: str | None = None) -> str:
    """Upload an exported folder to the Hugging Face Hub: ``HfApi.create_repo(repo_id,
    private=private, exist_ok=True)`` then ``HfApi.upload_folder`` (one commit holding every
    file of ``folder``).

    Args:
        folder: the exported folder (e.g. the return value of :func:`export_from_run`).
        repo_id: ``namespace/name`` of a model repository (created when missing).
        private: create the repository private (else the namespace's default; an existing
            repository keeps its visibility).
        token: a Hub token; ``None``: ``HF_TOKEN`` or the one saved by ``hf auth login``.
        endpoint: the Hub's URL; ``None``: ``HF_ENDPOINT`` or https://huggingface.co.
    Returns:
        The commit's URL.
    Raises:
        ValueError: a bad ``repo_id``, or no token anywhere (checked before any request).
        HubPushError: the Hub refused or could not be reached (its answer, one line).
    """
    check_hub_target(repo_id, token)
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                 commit_message=commit_message or f"cycleqd export ({Path(folder).name})")
    except _HUB_ERRORS as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise HubPushError(f"push to {repo_id} at {api.endpoint} failed: {first}; the export is "
                           f"complete in {folder}: retry with `hf upload {repo_id} {folder}`") from e
    return str(getattr(info, "commit_url", info))


def check_hub_target(repo_id: str, token: str | None = None) -> None:
    """ValueError (one line) for a repo id that is not ``namespace/name`` or when no token is
    set (``token``, ``HF_TOKEN``, ``hf auth login``) -- before an export's expensive work."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"--push-to-hub {repo_id!r}: {e}") from None
    if "/" not in repo_id:
        raise ValueError(f"--push-to-hub {repo_id!r}: expected NAMESPACE/NAME (your user or organisation)")
    if not (token or get_token()):
        raise ValueError("--push-to-hub: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
