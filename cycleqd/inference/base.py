"""The generation-backend seam: chat messages in, text out (greedy by default)."""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, TypedDict, runtime_checkable

import torch


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


@runtime_checkable
class GenerationBackend(Protocol):
    """A loaded language model that answers batches of conversations.

    Attributes:
        fingerprint: identifies the weights currently loaded (used as a cache key).
    """

    fingerprint: str

    def generate(self, conversations: Sequence[Sequence[Message]], *, max_new_tokens: int,
                 stop: Sequence[str] = ()) -> list[str]:
        """Greedy-decode one reply per conversation (chat template applied); the reply is
        cut before the first stop string. Returns len(conversations) strings."""
        ...

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], fingerprint: str) -> None:
        """Replace the model's weights in place (same names and shapes as the base)."""
        ...
