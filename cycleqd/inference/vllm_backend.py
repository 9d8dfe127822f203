"""vLLM generation backend with in-place weight swaps (GPU; optional extra ``vllm``).

The engine (``vllm.LLM``) is created once per worker. For each child, :meth:`load_weights`
writes the child's weights into the running engine's model instead of building a new engine
(minutes for an 8B model) -- as the official CycleQD does (``utils/helpers.py:
load_hf_params_to_vllm`` copies HF tensors into ``llm.llm_engine.driver_worker.model_runner
.model``). We use the model's own ``load_weights(iterable of (hf_name, tensor))``, which
handles the fused layouts (``qkv_proj``, ``gate_up_proj``), tied embeddings and tensor-
parallel sharding for every architecture vLLM supports, instead of hand-written Llama fusing.

Where the model lives:

- in-process (vLLM V0, or V1 with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which this class sets
  before creating the engine unless the caller set it): the model object is reached through
  the executor's driver worker, and tensors are copied directly (no serialisation);
- otherwise (V1 engine core in another process): ``LLM.collective_rpc`` ships the weights
  to each worker and calls the same ``load_weights`` there.

After a swap the prefix cache is reset: cached KV blocks of a prompt computed with the
previous weights must never be reused for the new ones (with automatic prefix caching on,
the system message shared by every prompt would otherwise keep the old model's KV).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cycleqd.inference._checks import check_generate_args, check_state_dict, cut_at_stop
from cycleqd.inference.base import Conversation

#: attribute paths from ``vllm.LLM`` to the in-process ``nn.Module`` (newest first).
MODEL_PATHS: tuple[tuple[str, ...], ...] = (
    ("llm_engine", "model_executor", "driver_worker", "worker", "model_runner", "model"),
    ("llm_engine", "engine_core", "engine_core", "model_executor", "driver_worker", "worker",
     "model_runner", "model"),
    ("llm_engine", "model_executor", "driver_worker", "model_runner", "model"),
    ("llm_engine", "driver_worker", "model_runner", "model"),  # vLLM <= 0.5 (official code)
)


def _follow(obj: Any, path: Sequence[str]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def find_engine_model(llm: Any) -> torch.nn.Module | None:
    """The engine's in-process model (an ``nn.Module`` with ``load_weights``), or None when
    the model lives in another process."""
    for path in MODEL_PATHS:
        try:
            m = _follow(llm, path)
        except AttributeError:
            continue
        if m is not None and callable(getattr(m, "load_weights", None)):
            return m
    return None


def _rpc_load_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside a vLLM worker (``collective_rpc``): load HF-named weights in place."""
    model = worker.model_runner.model
    loaded = model.load_weights(weights=iter(weights))
    return len(loaded) if loaded is not None else len(weights)


def safetensors_shapes(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of the checkpoint's tensors, read from safetensors headers (no data)."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {model_path}; cannot check load_weights shapes")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


class VLLMBackend:
    """A :class:`~cycleqd.inference.base.GenerationBackend` on a running vLLM engine.

    Args:
        model_path: HF folder of the base model (config, tokenizer, safetensors).
        fingerprint: identity of the weights initially loaded (default ``"base:" + path``).
        dtype: engine dtype (``"bfloat16"`` as the official code; ``"float32"`` for exactness).
        gpu_memory_utilization, max_model_len, enforce_eager, seed: ``vllm.LLM`` options
            (official: 0.8, 4096, True).
        chat_template: Jinja template overriding the tokenizer's.
        llm: an already created engine (or a stand-in with the same attributes, for tests);
            then no engine is created and ``model_path`` is only used for shapes (may be None).
        reference_shapes: name -> shape used to validate ``load_weights`` (default: read from
            ``model_path``'s safetensors).
        **llm_kwargs: more ``vllm.LLM`` arguments (``tensor_parallel_size``...).

    Raises:
        ImportError: vLLM is not installed (``pip install 'cycleqd[vllm]'``).
        ValueError: no way to know the weight shapes.
    """

    def __init__(self, model_path: str | Path | None, *, fingerprint: str | None = None,
                 dtype: str = "bfloat16", gpu_memory_utilization: float = 0.8,
                 max_model_len: int = 4096, enforce_eager: bool = True, seed: int = 0,
                 chat_template: str | None = None, llm: Any = None,
                 reference_shapes: Mapping[str, Sequence[int]] | None = None,
                 **llm_kwargs: Any) -> None:
        if reference_shapes is not None:
            self._shapes = {k: tuple(v) for k, v in reference_shapes.items()}
        elif model_path is not None:
            self._shapes = safetensors_shapes(model_path)
        else:
            raise ValueError("VLLMBackend needs model_path or reference_shapes")
        if llm is None:
            if model_path is None:
                raise ValueError("VLLMBackend needs model_path to create an engine")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            try:
                from vllm import LLM
            except ImportError as e:
                raise ImportError("VLLMBackend needs vLLM: pip install 'cycleqd[vllm]'") from e
            llm = LLM(str(model_path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                      max_model_len=max_model_len, enforce_eager=enforce_eager, seed=seed,
                      **llm_kwargs)
        self.llm = llm
        self.chat_template = chat_template
        # tied embeddings: vLLM skips lm_head.weight; it may be absent from a state dict
        self._optional = {"lm_head.weight"} if "lm_head.weight" in self._shapes else set()
        self.fingerprint = fingerprint if fingerprint is not None else f"base:{model_path}"
        self.last_swap_s: float | None = None

    def _sampling_params(self, max_new_tokens: int, stop: list[str]):
        from vllm import SamplingParams
        return SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_new_tokens,
                              stop=stop or None, repetition_penalty=1.0)

    def _tokenizer(self) -> Any:
        tok = self.llm.get_tokenizer()
        # some vLLM versions wrap the HF tokenizer
        return tok if hasattr(tok, "apply_chat_template") else getattr(tok, "tokenizer", tok)

    def prompt_ids(self, conversation: Conversation, response_prefix: str = "") -> list[int]:
        """Token ids of one prompt, built exactly as :meth:`HFBackend.prompt_ids
        <cycleqd.inference.hf.HFBackend.prompt_ids>` does (chat: rendered + prefix, no added
        special tokens; raw string: + prefix, the tokenizer's default special tokens)."""
        tok = self._tokenizer()
        if isinstance(conversation, str):
            return tok(conversation + response_prefix)["input_ids"]
        kwargs = {"chat_template": self.chat_template} if self.chat_template is not None else {}
        text = tok.apply_chat_template(list(conversation), tokenize=False,
                                       add_generation_prompt=True, **kwargs)
        return tok(text + response_prefix, add_special_tokens=False)["input_ids"]

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                 stop: Sequence[str] = (), response_prefix: str = "") -> list[str]:
        """Greedy replies (temperature 0), one per conversation, in input order; vLLM
        schedules all prompts together (continuous batching). See the protocol.

        Chat conversations without a ``response_prefix`` go through ``LLM.chat``; raw prompts
        and prefixed replies are tokenised here (:meth:`prompt_ids`) and sent to
        ``LLM.generate`` as token ids, so both backends feed the model the same tokens.
        """
        convs, stop = check_generate_args(conversations, max_new_tokens, stop, response_prefix)
        if not convs:
            return []
        params = self._sampling_params(max_new_tokens, stop)
        if not response_prefix and not any(isinstance(c, str) for c in convs):
            kwargs: dict[str, Any] = {"use_tqdm": False, "add_generation_prompt": True}
            if self.chat_template is not None:
                kwargs["chat_template"] = self.chat_template
            outs = self.llm.chat(convs, params, **kwargs)
        else:
            prompts = [{"prompt_token_ids": self.prompt_ids(c, response_prefix)} for c in convs]
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [cut_at_stop(o.outputs[0].text, stop) for o in outs]

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], fingerprint: str) -> None:
        """Load new weights (HF names, e.g. ``model.layers.0.self_attn.q_proj.weight``) into the
        running engine in place, then reset the prefix cache.

        Args:
            state_dict: name -> tensor, the base checkpoint's names and shapes.
            fingerprint: identity of the new weights.
        Raises:
            ValueError: names/shapes differ from the base checkpoint (checked before any copy).
        """
        import time

        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("load_weights: fingerprint must be a non-empty string")
        check_state_dict(state_dict, self._shapes, optional=self._optional)
        t0 = time.perf_counter()
        model = find_engine_model(self.llm)
        items = list(state_dict.items())
        if model is not None:
            device = next(model.parameters()).device
            model.load_weights(weights=((k, v.to(device, non_blocking=True)) for k, v in items))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        else:
            rpc: Callable | None = getattr(self.llm, "collective_rpc", None)
            if rpc is None:
                raise RuntimeError("cannot reach the vLLM model: no in-process model and no "
                                   "collective_rpc (unsupported vLLM version)")
            rpc(_rpc_load_weights, args=([(k, v.cpu()) for k, v in items],))
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if callable(reset):
            reset()
        self.fingerprint = fingerprint
        self.last_swap_s = time.perf_counter() - t0
