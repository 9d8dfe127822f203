"""The poisoned-slot scenario the NaN-leak attack tests share (test_decode_stream,
test_fastllama): one helper, so both attacks run the same stream."""

from __future__ import annotations

from cycleqd.inference import HFBackend
from cycleqd.inference.base import Request


def poisoned_stream(d, A: list[int], B: list[int], C: list[int], bad: int, *, fast: bool,
                    min_shared_prefix: int) -> tuple[str, str, str]:
    """Load the model at ``d`` with token ``bad``'s embedding set to inf, stream A (1 token,
    its KV turns NaN) and C together, then B once A has left (C moves into A's old slot and
    shares an attention chunk with B), then C alone on the same backend. Returns (C's
    reply in the stream, C's reply alone, B's reply), 12 new tokens each."""
    be = HFBackend.from_pretrained(d, batch_size=2, fast=fast, min_shared_prefix=min_shared_prefix)
    sd = {k: v.clone() for k, v in be.model.state_dict().items()}
    sd["model.embed_tokens.weight"][bad] = float("inf")
    be.load_weights(sd, "poisoned")
    out, alone = {}, {}
    script = iter([[Request(A, 1, on_done=lambda t: out.__setitem__("A", t)),
                    Request(C, 12, on_done=lambda t: out.__setitem__("C", t))],
                   [Request(B, 12, on_done=lambda t: out.__setitem__("B", t))]])
    be.generate_stream(lambda block: next(script, None))
    it = iter([[Request(C, 12, on_done=lambda t: alone.__setitem__("C", t))]])
    be.generate_stream(lambda block: next(it, None))
    return out["C"], alone["C"], out["B"]
