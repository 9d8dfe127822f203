"""The generation-backend seam: chat messages (or raw prompts) in, text out (greedy)."""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, TypedDict, runtime_checkable

import torch


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


#: one prompt: a chat conversation (rendered with the chat template) or a raw prompt string
#: (used verbatim, no chat template; how the official CycleQD code prompts for MBPP+)
Conversation = Sequence[Message] | str


@runtime_checkable
class GenerationBackend(Protocol):
    """A loaded language model that answers batches of conversations.

    Attributes:
        fingerprint: identifies the weights currently loaded (used as a cache key).
    """

    fingerprint: str

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                 stop: Sequence[str] = (), response_prefix: str = "") -> list[str]:
        """Greedy-decode one reply per conversation; returns len(conversations) strings.

        A conversation is either a list of messages, rendered with the chat template
        (``add_generation_prompt=True``) and tokenised without added special tokens, or a
        raw prompt string, used verbatim and tokenised with the tokenizer's default special
        tokens (e.g. Llama 3's BOS) -- what vLLM does with a text prompt, and so what the
        official CycleQD code (fishfarm ``VLLMModel.generate``) feeds the model.

        ``response_prefix`` is appended to every prompt text (after the generation prompt)
        before tokenising, so the reply continues it (fishfarm's ``assistant_prefill``, e.g.
        ``"```python"``). The returned reply EXCLUDES the prefix (as vLLM's output text
        does). Each reply is cut before the first stop string it contains (the prefix is
        not searched).
        """
        ...

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], fingerprint: str) -> None:
        """Replace the model's weights in place (same names and shapes as the base)."""
        ...
