"""The generation-backend seam: chat messages (or raw prompts) in, text out (greedy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence, TypedDict, runtime_checkable

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


@dataclass
class Request:
    """One greedy generation request for :meth:`HFBackend.generate_stream
    <cycleqd.inference.hf.HFBackend.generate_stream>` (continuous batching across callers).

    Attributes:
        prompt_ids: the prompt's token ids (non-empty list of ints, e.g. from
            ``HFBackend.prompt_ids``).
        max_new_tokens: this row's generation budget (tokens, >= 1).
        stop: strings that end this row's reply; the reply passed to ``on_done`` is cut
            before the first one.
        on_done: called once, from the decoding thread, with the finished reply (text up to
            the first EOS, special tokens removed, cut at the first stop string).
    Raises:
        ValueError: on construction, naming the first malformed field.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    on_done: Callable[[str], None] = field(default=lambda _text: None)

    def __post_init__(self) -> None:
        ids = self.prompt_ids
        if not isinstance(ids, (list, tuple)) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError("Request.prompt_ids must be a non-empty list of non-negative ints")
        self.prompt_ids = list(ids)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"Request.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("Request.stop must be a list of non-empty strings")
        self.stop = list(self.stop)
        if not callable(self.on_done):
            raise ValueError("Request.on_done must be callable")
