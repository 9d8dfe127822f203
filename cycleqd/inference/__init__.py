"""Generation backends behind :class:`~cycleqd.inference.base.GenerationBackend`:
:class:`HFBackend` (transformers, batched/left-padded/KV-cached, CPU or GPU) and
:class:`~cycleqd.inference.vllm_backend.VLLMBackend` (GPU, in-place weight swaps; imported
lazily so that vLLM stays optional)."""

from cycleqd.inference.base import Conversation, GenerationBackend, Message
from cycleqd.inference.fingerprint import fingerprint_state_dict
from cycleqd.inference.hf import HFBackend

__all__ = ["Conversation", "GenerationBackend", "HFBackend", "Message", "VLLMBackend", "fingerprint_state_dict"]


def __getattr__(name: str):
    if name == "VLLMBackend":
        from cycleqd.inference.vllm_backend import VLLMBackend
        return VLLMBackend
    raise AttributeError(name)
