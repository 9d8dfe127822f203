"""GGUF -> plain Hugging Face folder (dequantised float weights).

``transformers`` reads GGUF files (``from_pretrained(dir, gguf_file=name)``, needs the
``gguf`` package) and dequantises every tensor, but the loaded model keeps a GGUF
``quantization_config`` and refuses ``save_pretrained``. So we copy its state dict into a
model built from the cleaned config and save that: config, generation config, tokenizer and
safetensors, loadable by ``transformers`` and vLLM unchanged.

Memory: the dequantised model is materialised once in RAM (fp32 by default; SmolLM2-135M
~0.55 GB, an 8B Q4 file ~32 GB in fp32 / 16 GB in bf16 -- pass ``dtype=torch.bfloat16``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from cycleqd._io import atomic_directory


def convert_gguf(gguf_path: Path | str, out_dir: Path | str, *,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise ``gguf_path`` into an HF folder at ``out_dir`` (written atomically).

    Args:
        gguf_path: a ``.gguf`` file (any quantisation ``transformers`` supports).
        out_dir: destination folder; written under a temporary name then renamed, so a
            crash never leaves a half-written folder at ``out_dir``.
        dtype: stored dtype of the float checkpoint. The dequantised values are exact in
            fp32 (Q4_1/Q8_0 blocks are fp16 scale x int), rounded in bf16/fp16.
    Returns:
        ``out_dir`` as a Path.
    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        ValueError: the file is not GGUF (bad magic) or transformers cannot read it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path} is not a GGUF file (magic bytes are not 'GGUF')")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        q = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers raises many types for unsupported archs/quants
        raise ValueError(f"transformers could not load GGUF {gguf_path}: {e}") from e
    cfg_dict = q.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    cfg_dict["dtype"] = str(dtype).removeprefix("torch.")
    config = AutoConfig.for_model(**cfg_dict)
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = {k: v.detach().to(dtype) for k, v in q.state_dict().items()}
    plain.load_state_dict(sd, strict=True, assign=True)
    plain.tie_weights()
    del q
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None), do_sample=False)

    with atomic_directory(out_dir) as tmp:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return out_dir
