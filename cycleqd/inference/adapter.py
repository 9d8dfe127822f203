"""Model adapters: turn a child's full weights into what the skills evaluate."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelAdapter(Protocol):
    """``bind(weights, fingerprint)`` loads theta (name -> tensor, base's names/shapes) and
    returns the object passed to every ``Skill.evaluate`` for this model."""

    def bind(self, weights: Mapping[str, torch.Tensor], fingerprint: str) -> Any: ...


class LLMAdapter:
    """Loads weights into one long-lived generation backend (HF transformers or vLLM) in
    place, as the official code does with vLLM, and hands the backend to the skills."""

    def __init__(self, backend: Any):
        self.backend = backend

    @classmethod
    def from_config(cls, backend_cfg: Any, info: Any) -> "LLMAdapter":
        """Args:
            backend_cfg: :class:`cycleqd.config.BackendConfig`.
            info: the weight space's model info (``model_dir``: HF folder of the base with
                config and tokenizer).
        """
        model_dir = getattr(info, "model_dir", info)
        if backend_cfg.type == "vllm":
            from cycleqd.inference.vllm_backend import VLLMBackend

            dtype = "bfloat16" if backend_cfg.dtype == "auto" else backend_cfg.dtype
            return cls(VLLMBackend(str(model_dir), dtype=dtype,
                                   gpu_memory_utilization=backend_cfg.gpu_memory_utilization))
        from cycleqd.inference.hf import HFBackend

        dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[backend_cfg.dtype]
        return cls(HFBackend.from_pretrained(str(model_dir), device=backend_cfg.device, dtype=dtype,
                                             batch_size=backend_cfg.batch_size))

    def bind(self, weights: Mapping[str, torch.Tensor], fingerprint: str) -> Any:
        self.backend.load_weights(weights, fingerprint)
        return self.backend

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close:
            close()
