"""The lockstep multi-turn episode runner both AgentBench skills (DB-Bench, OS
interaction) share: an :class:`Episode` protocol, :func:`run_lockstep` (every running
episode's conversation in one generation batch per turn) and :func:`evaluate_cached` (the
shared ``evaluate`` body over the per-sample cache)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from cycleqd.skills.cache import item_keys, model_key

__all__ = ["Episode", "evaluate_cached", "run_lockstep", "run_streaming"]


class Episode:
    """One multi-turn episode: the conversation so far and whether it has ended.

    Subclasses implement :meth:`step` (consume one model reply: act, append the
    observation, or finish) and may override :meth:`finish` (final scoring).
    """

    def __init__(self, sample_id: str, messages: list[dict[str, str]]) -> None:
        self.sample_id = sample_id
        self.messages = messages
        self.n_prompt = len(messages)  # messages before the model's first turn
        self.done = False
        self.score = 0.0
        self.detail: dict[str, Any] = {}

    def step(self, reply: str) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the episode ended (also when its round budget ran out)."""

    def close(self) -> None:
        """Free the episode's sandbox/database (always called)."""


def evaluate_cached(skill: Any, model: Any) -> dict[str, float]:
    """The shared body of the agent skills' ``evaluate``: reuse cached per-sample outcomes,
    run the missing items' episodes with ``skill.run_episodes`` (greedy,
    ``skill.max_new_tokens`` / ``skill.stop``), cache their outcomes and details (without
    transcripts), keep the details with their transcripts in ``skill.last_details``.

    An outcome is reused only for the same weights run the same way
    (:func:`~cycleqd.skills.cache.model_key`), the same ``skill.cache_key`` and the same
    item content (:func:`~cycleqd.skills.cache.item_key`: an item of another file with the
    same id, or an item edited in place, is scored again).

    Returns:
        item id -> score in [0, 1], for every ``skill.items`` (in that order).
    """
    ids = [it.id for it in skill.items]
    mk = model_key(model)
    cache = skill.cache if mk else None
    keys = item_keys(skill.items) if cache is not None else {}  # ~25 ms per 100 DB items
    hits: dict[str, float] = cache.get_many(mk, skill.cache_key, keys) if cache is not None else {}
    todo = [it for it in skill.items if it.id not in hits]
    new: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    if todo:
        generate = _Generate(model, skill.max_new_tokens, skill.stop)
        for sid, ep in skill.run_episodes(todo, generate).items():
            new[sid] = ep.score
            details[sid] = dict(ep.detail, transcript=[m["content"][:2000]
                                                       for m in ep.messages[ep.n_prompt:]])
        if cache is not None:
            # an evaluator failure (no machine/database could be started: detail
            # ``evaluator_error``) says nothing about the model: scored 0 now, never cached
            new_cached = {k: v for k, v in new.items() if not details[k].get("evaluator_error")}
            cache.put_many(mk, skill.cache_key, new_cached,
                           {k: {kk: vv for kk, vv in v.items() if kk != "transcript"}
                            for k, v in details.items()}, items=keys)
    skill.last_details = details
    return {i: float(hits.get(i, new.get(i, 0.0))) for i in ids}


class _Generate:
    """``generate(conversations) -> replies`` with the skill's decoding settings; when the
    model has ``submit`` (a backend attached to a
    :class:`~cycleqd.inference.pool.GenerationPool`), also ``submit(conversation) ->
    Future[reply]``, which lets :func:`run_lockstep` run each episode at its own pace."""

    def __init__(self, model: Any, max_new_tokens: int, stop: Sequence[str]) -> None:
        self.model, self.max_new_tokens, self.stop = model, max_new_tokens, stop
        if callable(getattr(model, "submit", None)):
            self.submit = self._submit

    def __call__(self, convs: list) -> list[str]:
        return self.model.generate(convs, max_new_tokens=self.max_new_tokens, stop=self.stop)

    def _submit(self, conv: list) -> Any:
        return self.model.submit(conv, max_new_tokens=self.max_new_tokens, stop=self.stop)


def _step(ep: Episode, reply: str) -> None:
    """Let ``ep`` act on ``reply``; a crashed step is a failed sample."""
    ep.messages.append({"role": "assistant", "content": reply})
    try:
        ep.step(reply)
    except Exception as e:  # noqa: BLE001 - a crashed step is a failed sample
        ep.detail["error"] = f"{type(e).__name__}: {e}"
        ep.done = True


def _finish(ep: Episode) -> None:
    ep.done = True
    try:
        ep.finish()
    except Exception as e:  # noqa: BLE001
        ep.detail["error"] = f"{type(e).__name__}: {e}"
        ep.score = 0.0


def run_streaming(episodes: Sequence[Episode], submit: Callable[[list[dict[str, str]]], Any],
                  *, max_turns: int, workers: int = 4) -> None:
    """Run each episode at its own pace: one thread per episode submits its conversation
    (``submit(messages) -> Future[reply]``), acts on the reply, and submits its next turn as
    soon as its observation is back -- no episode waits for the slowest of a turn, and the
    generation pool's batch stays full. At most ``workers`` episodes act (sandbox/database
    calls) at once. Same turns, replies and scores as :func:`run_lockstep` (each episode's
    conversation depends only on its own replies); the first ``submit`` error is re-raised
    after every episode stopped.
    """
    gate = threading.Semaphore(max(1, workers))
    errors: list[BaseException | None] = [None] * len(episodes)

    def run(i: int) -> None:
        ep = episodes[i]
        try:
            for _ in range(max_turns):
                if ep.done:
                    break
                reply = submit(list(ep.messages)).result()
                with gate:
                    _step(ep, reply)
        except BaseException as e:  # noqa: BLE001 - re-raised below, like run_lockstep's
            errors[i] = e
            return
        with gate:
            _finish(ep)

    threads = [threading.Thread(target=run, args=(i,), name=f"episode-{i}", daemon=True)
               for i in range(len(episodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    err = next((e for e in errors if e is not None), None)
    if err is not None:
        raise err


def run_lockstep(episodes: Sequence[Episode], generate: Callable[[list[list[dict[str, str]]]], list[str]],
                 *, max_turns: int, workers: int = 4) -> None:
    """Run episodes in lockstep: each turn sends ONE batch with the conversation of every
    episode still running to ``generate``, then lets each episode act on its reply
    (``workers`` at a time: sandbox/database calls are I/O bound). After ``max_turns``
    model replies an episode stops; :meth:`Episode.finish` then scores it.

    Batching the episodes of a split this way makes the generation backend's batching
    pay off; episodes never see each other's state. When ``generate`` has a ``submit``
    (the model is attached to a :class:`~cycleqd.inference.pool.GenerationPool`), the
    episodes run with :func:`run_streaming` instead (same replies and scores).
    """
    submit = getattr(generate, "submit", None)
    if submit is not None:
        run_streaming(episodes, submit, max_turns=max_turns, workers=workers)
        return
    pool = ThreadPoolExecutor(max_workers=max(1, workers)) if workers > 1 else None
    try:
        for _ in range(max_turns):
            active = [ep for ep in episodes if not ep.done]
            if not active:
                break
            replies = generate([list(ep.messages) for ep in active])
            if len(replies) != len(active):
                raise RuntimeError(f"generate returned {len(replies)} replies for "
                                   f"{len(active)} conversations")

            if pool is not None:
                list(pool.map(lambda pair: _step(*pair), zip(active, replies)))
            else:
                for ep, reply in zip(active, replies):
                    _step(ep, reply)

        if pool is not None:
            list(pool.map(_finish, episodes))
        else:
            for ep in episodes:
                _finish(ep)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
