"""GrowingLayer: in-place appends hold exactly what DynamicLayer's torch.cat holds."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from cycleqd.inference._kvcache import GrowingLayer, growing_cache, join, joinable, trim


def test_growing_layer_equals_dynamic_layer_across_regrowth():
    g, d = GrowingLayer(), DynamicLayer()
    torch.manual_seed(0)
    steps = [torch.randn(3, 2, 7, 4)] + [torch.randn(3, 2, 1, 4) for _ in range(GrowingLayer.GROW + 5)]
    for k in steps:
        gk, gv = g.update(k, -k)
        dk, dv = d.update(k, -k)
        assert torch.equal(gk, dk) and torch.equal(gv, dv)
    assert g.get_seq_length() == d.get_seq_length() == 7 + GrowingLayer.GROW + 5
    sel = torch.tensor([2, 0])
    g.batch_select_indices(sel)
    d.batch_select_indices(sel)
    k = torch.randn(2, 2, 1, 4)
    assert torch.equal(g.update(k, k)[0], d.update(k, k)[0])


def test_join_and_trim_left_pad_and_drop_unused_positions():
    a, b = growing_cache(), growing_cache()
    a.update(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4), 0)
    b.update(2 * torch.ones(2, 2, 3, 4), 2 * torch.ones(2, 2, 3, 4), 0)
    assert joinable(a) and joinable(b) and not joinable(None)
    mask = join(a, torch.ones(1, 5, dtype=torch.long), b, torch.ones(2, 3, dtype=torch.long))
    assert mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    keys = a.layers[0].keys
    assert keys.shape == (3, 2, 5, 4)
    assert torch.equal(keys[1:, :, :2], torch.zeros(2, 2, 2, 4)) and torch.equal(keys[1:, :, 2:], 2 * torch.ones(2, 2, 3, 4))
    a.batch_select_indices(torch.tensor([1, 2]))  # the long row leaves
    mask = trim(a, mask[1:])
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]] and a.layers[0].keys.shape == (2, 2, 3, 4)
    k = torch.zeros(2, 2, 1, 4)
    assert a.layers[0].update(k, k)[0].shape == (2, 2, 4, 4)
