"""Tiny random-init chat models (real HF folders with a BPE tokenizer and ChatML template)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama_dirs(tmp_path_factory):
    """Two tiny Llama folders with the same architecture and different weights (seeds 0, 1)."""
    from cycleqd.models.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("tiny-llama")
    return (make_tiny_llama(root / "a", seed=0, hidden_size=64, num_layers=2),
            make_tiny_llama(root / "b", seed=1, hidden_size=64, num_layers=2))


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory):
    from cycleqd.models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-tied") / "t", seed=2, hidden_size=32,
                           num_layers=1, tie_word_embeddings=True)


@pytest.fixture()
def convs():
    """Prompts of very different lengths (exercise left padding and length sorting)."""
    texts = ["Hi", "Write a python function to add two numbers.",
             "SELECT name FROM users WHERE age > 30; explain the query " * 3, "ls -la",
             "The quick brown fox jumps over the lazy dog. " * 5, "def f(x):", "2+2=?"]
    return [[{"role": "system", "content": "You are terse."}, {"role": "user", "content": t}]
            if i % 2 else [{"role": "user", "content": t}] for i, t in enumerate(texts)]
