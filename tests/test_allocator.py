"""The CPU heap context of a fit (glibc's malloc thresholds): reentrant, optional, numbers unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torchem import EMModel, allocator
from torchem.models import MODELS


def test_context_is_reentrant_and_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TORCHEM_CPU_HEAP", "1")
    available = allocator.heap_tuning_available()
    with allocator.cpu_heap() as outer:
        assert outer == available
        with allocator.cpu_heap() as inner:
            assert inner == available
            assert allocator._depth == (2 if available else 0)
        assert allocator._depth == (1 if available else 0)
    assert allocator._depth == 0
    with allocator.cpu_heap(enabled=False) as changed:
        assert not changed and allocator._depth == 0
    monkeypatch.setenv("TORCHEM_CPU_HEAP", "0")
    assert not allocator.heap_tuning_available()
    with allocator.cpu_heap() as changed:
        assert not changed


def test_context_is_released_when_the_fit_raises():
    with pytest.raises(RuntimeError):
        with allocator.cpu_heap():
            raise RuntimeError("inside")
    assert allocator._depth == 0


def test_fit_is_identical_with_and_without(monkeypatch):
    fit = MODELS["rw1a1b"]
    sim = fit.simulate(np.tile([[0.4, 3.0]], (6, 1)), nblocks=2, ntrials=20, seed=1)
    data = [[sim[k][i] for k in fit.inputs] for i in range(6)]
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("TORCHEM_CPU_HEAP", flag)
        res = EMModel(data, fit, device="cpu").fit(verbose=0)
        out.append(res.m)
        assert allocator._depth == 0
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
