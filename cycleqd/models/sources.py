"""Where a model's weights come from: a spec (folder, checkpoint file, GGUF, peft LoRA
adapter, hub id) resolved to its kind and files, without reading any tensor.

Accepted sources (``spec`` strings, resolved by :func:`resolve_source`):

========================  ==================================================================
``/path/to/hf_folder``    ``config.json`` + ``model.safetensors`` / sharded
                          ``model.safetensors.index.json`` / ``pytorch_model.bin`` (+ index)
``/path/model.safetensors``  a bare safetensors checkpoint (config taken from its folder if any)
``/path/model.bin|.pt``   a PyTorch state-dict checkpoint (``torch.load(weights_only=True, mmap=True)``)
``/path/model.gguf``      a GGUF file, dequantised once through ``transformers`` into a plain HF
                          folder under ``cache_dir/gguf/`` (see :mod:`cycleqd.models.gguf`)
``/path/lora_adapter``    a peft LoRA adapter folder (``adapter_config.json``); experts only:
                          turned into a dense task vector ``scaling * B @ A`` per target
``org/name[@revision]``   a Hugging Face hub id (``huggingface_hub.snapshot_download``, then
                          one of the above; needs network -- not exercised by the tests)
========================  ==================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SourceKind = Literal["hf_dir", "safetensors", "bin", "gguf", "lora"]

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                    "chat_template.json", "added_tokens.json")


class ModelLoadError(ValueError):
    """A model source cannot be read or does not match the base (message says why)."""


@dataclass
class ResolvedSource:
    """Where a model's weights and config live.

    Attributes:
        spec: the user's string.
        kind: ``hf_dir`` | ``safetensors`` | ``bin`` | ``gguf`` | ``lora``.
        files: weight files (safetensors/bin shards; the gguf file; the adapter file).
        config_dir: folder holding ``config.json`` (``None`` for a bare checkpoint file).
        hub_id: the hub repo id if it came from the hub.
    """

    spec: str
    kind: SourceKind
    files: list[Path]
    config_dir: Path | None
    hub_id: str | None = None

    def fingerprint(self) -> str:
        """Cheap identity of the weight files (no read of their content): resolved path,
        size, mtime, device, inode and ctime of each. Every way of putting other bytes at
        the same path changes the inode (``cp -p``, ``rsync -a``, ``tar x`` write a new
        file) or the ctime (an in-place write; users cannot set ctime, unlike the mtime
        that those tools restore), so a retrained expert never reuses the old one's SVD
        basis or conversion. A metadata-only change (chmod) changes it too: a recompute,
        never a stale reuse."""
        h = hashlib.blake2b(digest_size=12)
        h.update(self.kind.encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_dev}|{st.st_ino}|"
                     f"{st.st_ctime_ns}".encode())
        return h.hexdigest()


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?", spec)) and not spec.startswith(".")


def folder_weights(folder: Path) -> tuple[SourceKind, list[Path]] | None:
    """The weight files of an HF folder (an index's shards, the single checkpoint, or every
    ``*.safetensors``) and their kind; None when it holds none.

    Raises:
        ModelLoadError: an unreadable index, or one naming a missing shard.
    """
    for idx in _WEIGHT_INDEXES:
        p = folder / idx
        if p.is_file():
            try:
                wm = json.loads(p.read_text())["weight_map"]
            except Exception as e:
                raise ModelLoadError(f"{p}: not a valid weight index ({e})") from e
            files = [folder / f for f in dict.fromkeys(wm.values())]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"{p} lists shard {missing[0].name} which is missing")
            return ("safetensors" if idx.startswith("model.safetensors") else "bin"), files
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return ("safetensors" if name.endswith(".safetensors") else "bin"), [folder / name]
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return "safetensors", st
    return None


def resolve_source(spec: str | os.PathLike, *, revision: str | None = None) -> ResolvedSource:
    """Classify a model spec (see the module table). Cheap: reads no tensors.

    Raises:
        FileNotFoundError: a local path that does not exist (and is not a hub id).
        ModelLoadError: a folder without recognisable weights, an ambiguous folder, a
            non-LoRA peft adapter.
    """
    s = str(spec)
    p = Path(s).expanduser()
    if p.exists():
        if p.is_file():
            suf = p.suffix.lower()
            cfg = p.parent if (p.parent / "config.json").is_file() else None
            if suf == ".safetensors":
                return ResolvedSource(s, "safetensors", [p], cfg)
            if suf in (".bin", ".pt", ".pth"):
                return ResolvedSource(s, "bin", [p], cfg)
            if suf == ".gguf":
                return ResolvedSource(s, "gguf", [p], None)
            if p.name == "adapter_config.json":
                return resolve_source(p.parent)
            raise ModelLoadError(f"{p}: unknown checkpoint type {suf!r} (expected .safetensors, "
                                 ".bin/.pt/.pth, .gguf, or an HF / peft folder)")
        if (p / "adapter_config.json").is_file():
            cfg = json.loads((p / "adapter_config.json").read_text())
            if cfg.get("peft_type", "LORA") != "LORA":
                raise ModelLoadError(f"{p}: peft adapter type {cfg.get('peft_type')!r} is not "
                                     "supported (only LoRA adapters)")
            files = [f for f in (p / "adapter_model.safetensors", p / "adapter_model.bin") if f.is_file()]
            if not files:
                raise ModelLoadError(f"{p}: adapter_config.json but no adapter_model.safetensors/.bin")
            return ResolvedSource(s, "lora", files[:1], p)
        found = folder_weights(p)
        if found is not None:
            if not (p / "config.json").is_file():
                raise ModelLoadError(f"{p}: weights but no config.json")
            return ResolvedSource(s, "hf_dir", found[1], p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedSource(s, "gguf", ggufs, None)
        if len(ggufs) > 1:
            raise ModelLoadError(f"{p}: several .gguf files ({[g.name for g in ggufs]}); name one")
        raise ModelLoadError(f"{p}: no model weights found (expected model.safetensors, "
                             "pytorch_model.bin, an index, a .gguf or adapter_config.json)")
    if _looks_like_hub_id(s) and not s.startswith(("/", "~")):
        return _resolve_hub(s, revision)
    raise FileNotFoundError(f"model source {s!r} does not exist (not a local path, not a hub id)")


def _resolve_hub(spec: str, revision: str | None) -> ResolvedSource:
    """Download (or reuse the HF cache of) a hub repo's weights, config and tokenizer."""
    from huggingface_hub import snapshot_download

    repo, _, rev = spec.partition("@")
    try:
        folder = snapshot_download(repo, revision=rev or revision, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise ModelLoadError(f"cannot download {spec!r} from the Hugging Face hub: {e}") from e
    r = resolve_source(folder)
    r.spec, r.hub_id = spec, repo
    return r


def tokenizer_files(folder: Path) -> list[Path]:
    """Tokenizer files present in an HF folder."""
    return [folder / f for f in _TOKENIZER_FILES if (folder / f).is_file()]
