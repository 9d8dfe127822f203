"""One generation batch for many callers: a thread-safe pool in front of one backend.

A child's skills (and each agent skill's episodes) run in their own threads; every
``generate`` they call becomes requests queued here, and ONE decode thread feeds them to the
backend:

* a backend with ``generate_stream(poll)`` (:class:`~cycleqd.inference.hf.HFBackend`'s
  continuous-batching loop) takes new requests between decode steps, each row with its own
  ``max_new_tokens`` and ``stop``: an agent episode's next turn joins the running batch as
  soon as its observation is back, coding prompts share the batch with the agents' turns, so
  the batch stays full until the last episode ends;
* any other backend (vLLM, test doubles): the requests pending when the decode thread is
  free are merged into one ``generate`` call per (``max_new_tokens``, ``stop``,
  ``response_prefix``) group.

Greedy decoding makes a reply a function of its prompt (up to rare near-ties in padded
batches, as for any batch composition, see :mod:`cycleqd.inference.hf`), so a skill scores
the same through the pool as alone; callers see exactly the ``generate`` contract.

Usage::

    with GenerationPool(backend).attached():   # backend.generate now routes through the pool
        ... run skills in threads, each calling backend.generate(...) ...
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from cycleqd.inference._checks import check_generate_args, cut_at_stop
from cycleqd.inference.base import Conversation


def _resolve(fut: Future, value: Any = None, error: BaseException | None = None) -> None:
    """Answer ``fut`` unless its caller cancelled it (a cancelled future raises
    ``InvalidStateError`` on ``set_*``, which must not kill the decode thread)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
    except InvalidStateError:   # cancelled (or already answered): nobody waits for it
        pass

__all__ = ["GenerationPool"]


@dataclass
class _Pending:
    conv: Conversation
    max_new_tokens: int
    stop: tuple[str, ...]
    prefix: str
    future: Future


class GenerationPool:
    """Queue of generation requests from many threads, decoded by one thread.

    Args:
        backend: a :class:`~cycleqd.inference.base.GenerationBackend`. With a callable
            ``generate_stream(poll)`` and ``prompt_ids(conv, prefix)`` (HF backend) the pool
            streams requests into its running batch; otherwise it merges pending requests
            into ``generate`` calls.
        stream: use ``generate_stream`` when the backend has it (default True).

    The pool must be :meth:`start`-ed (or used via :meth:`attached`) before requests are
    answered and :meth:`close`-d after the last one; a backend exception fails the requests
    it was decoding (their callers re-raise it), later requests still run.
    """

    def __init__(self, backend: Any, *, stream: bool = True) -> None:
        self.backend = backend
        self._generate = type(backend).generate.__get__(backend)   # the backend's own method
        self.streaming = bool(stream) and callable(getattr(backend, "generate_stream", None)) \
            and callable(getattr(backend, "prompt_ids", None))
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        # torch's intra-op thread count is per thread (OpenMP): the decode thread uses the
        # creating thread's, not the OpenMP default (measured on 2 shared cores: a 2-thread
        # team where 1 was set ran matmuls ~30x slower)
        import torch

        self._torch_threads = torch.get_num_threads()
        #: requests answered and backend calls made (``generate`` calls, or stream sessions)
        self.n_requests = 0
        self.n_calls = 0

    # ------------------------------------------------------------------ callers
    def submit(self, conversation: Conversation, *, max_new_tokens: int, stop: Sequence[str] = (),
               response_prefix: str = "") -> Future:
        """Queue one prompt; returns a Future of its reply (``generate``'s contract).

        Raises:
            ValueError: malformed arguments (at once, in the caller's thread).
            RuntimeError: the pool is closed.
        """
        return self.submit_many([conversation], max_new_tokens=max_new_tokens, stop=stop,
                                response_prefix=response_prefix)[0]

    def submit_many(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                    stop: Sequence[str] = (), response_prefix: str = "") -> list[Future]:
        """Queue several prompts at once (they reach the decode thread together)."""
        convs, stop_l = check_generate_args(conversations, max_new_tokens, stop, response_prefix)
        items = [_Pending(c, int(max_new_tokens), tuple(stop_l), response_prefix, Future())
                 for c in convs]
        with self._cond:
            if self._closed:
                raise RuntimeError("GenerationPool: submit after close")
            self._pending.extend(items)
            self._cond.notify_all()
        return [it.future for it in items]

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                 stop: Sequence[str] = (), response_prefix: str = "") -> list[str]:
        """Blocking :meth:`GenerationBackend.generate` through the pool (input order)."""
        futs = self.submit_many(conversations, max_new_tokens=max_new_tokens, stop=stop,
                                response_prefix=response_prefix)
        return [f.result() for f in futs]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "GenerationPool":
        """Start the decode thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cycleqd-generation-pool",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Answer what is queued, then stop the decode thread (waits for it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    @contextlib.contextmanager
    def attached(self) -> Iterator["GenerationPool"]:
        """Route ``backend.generate`` (and ``backend.submit``) through this pool while the
        block runs: skills keep calling the backend object they were given (so its
        fingerprint, cache identity and class are unchanged). Starts and closes the pool."""
        b = self.backend
        self.start()
        b.generate, b.submit = self.generate, self.submit
        try:
            yield self
        finally:
            for attr in ("generate", "submit"):
                b.__dict__.pop(attr, None)
            self.close()

    # ------------------------------------------------------------------ decode thread
    def _take(self, block: bool) -> list[_Pending] | None:
        with self._cond:
            while block and not self._pending and not self._closed:
                self._cond.wait()
            if self._pending:
                got, self._pending = self._pending, []
                return got
            return None if self._closed else []

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self._torch_threads)
        if self.streaming:
            self._run_stream()
        else:
            self._run_merged()

    def _run_merged(self) -> None:
        while True:
            got = self._take(block=True)
            if got is None:
                return
            groups: dict[tuple, list[_Pending]] = {}
            for it in got:
                groups.setdefault((it.max_new_tokens, it.stop, it.prefix), []).append(it)
            for (mnt, stop, prefix), items in groups.items():
                self.n_calls += 1
                try:
                    replies = self._generate([it.conv for it in items], max_new_tokens=mnt,
                                             stop=list(stop), response_prefix=prefix)
                    if len(replies) != len(items):
                        raise RuntimeError(f"backend returned {len(replies)} replies for "
                                           f"{len(items)} prompts")
                except BaseException as e:  # noqa: BLE001 - handed to the callers
                    for it in items:
                        _resolve(it.future, error=e)
                    continue
                for it, r in zip(items, replies):
                    self.n_requests += 1
                    _resolve(it.future, r)

    def _run_stream(self) -> None:
        from cycleqd.inference.base import Request

        b = self.backend
        live: set[Future] = set()

        def done(fut: Future, stop: tuple[str, ...]):
            def on_done(text: str) -> None:
                live.discard(fut)
                self.n_requests += 1
                _resolve(fut, cut_at_stop(text, list(stop)))
            return on_done

        def poll(block: bool):
            got = self._take(block)
            if not got:
                return got
            reqs = []
            for it in got:
                try:
                    ids = b.prompt_ids(it.conv, it.prefix)
                    req = Request(prompt_ids=list(ids), max_new_tokens=it.max_new_tokens,
                                  stop=list(it.stop), on_done=done(it.future, it.stop))
                except BaseException as e:  # noqa: BLE001 - this request fails, not the batch
                    _resolve(it.future, error=e)
                    continue
                live.add(it.future)
                reqs.append(req)
            return reqs

        while True:
            with self._cond:
                if self._closed and not self._pending:
                    return
            self.n_calls += 1
            try:
                b.generate_stream(poll)
            except BaseException as e:  # noqa: BLE001 - fail what was decoding, go on
                for f in list(live):
                    if not f.done():
                        _resolve(f, error=e)
                live.clear()
                continue
            for f in list(live):   # the stream ended without answering them: a backend bug
                if not f.done():
                    _resolve(f, error=RuntimeError("generate_stream returned before answering"))
            live.clear()
