"""Parameter transforms: closed forms, round trips, and the kind of value returned."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import torchem
from torchem import transforms as T

XS = [-30.0, -5.0, -1.3, -0.2, 0.0, 0.4, 2.5, 7.0, 30.0]

PAIRS = [
    (T.norm2alpha, T.alpha2norm, {}),
    (T.norm2beta, T.beta2norm, {}),
    (T.norm2beta, T.beta2norm, {"max_val": 10}),
    (T.norm2beta, T.beta2norm, {"max_val": 3.5}),
    (T.norm2exp, T.exp2norm, {}),
]
PAIR_IDS = ["alpha", "beta20", "beta10", "beta3.5", "exp"]


def _closed_forward(fwd, x, kw):
    if fwd is T.norm2alpha:
        return 1.0 / (1.0 + math.exp(-x))
    if fwd is T.norm2beta:
        return kw.get("max_val", 20) / (1.0 + math.exp(-x))
    if fwd is T.norm2exp:
        return math.exp(x)
    raise AssertionError(fwd)


@pytest.mark.parametrize("fwd,inv,kw", PAIRS, ids=PAIR_IDS)
def test_forward_matches_closed_form_for_floats(fwd, inv, kw):
    for x in XS:
        y = fwd(x, **kw)
        assert type(y) is float
        assert y == pytest.approx(_closed_forward(fwd, x, kw), rel=1e-13, abs=1e-300)


@pytest.mark.parametrize("fwd,inv,kw", PAIRS, ids=PAIR_IDS)
def test_round_trip_float(fwd, inv, kw):
    for x in [-8.0, -1.3, 0.0, 0.4, 2.5, 8.0]:
        back = inv(fwd(x, **kw), **kw)
        assert type(back) is float
        assert back == pytest.approx(x, abs=1e-9)


@pytest.mark.parametrize("fwd,inv,kw", PAIRS, ids=PAIR_IDS)
def test_round_trip_numpy_keeps_kind_and_shape(fwd, inv, kw):
    x = np.linspace(-6, 6, 24).reshape(2, 3, 4)
    y = fwd(x, **kw)
    assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == np.float64
    expected = np.vectorize(lambda v: _closed_forward(fwd, v, kw))(x)
    np.testing.assert_allclose(y, expected, rtol=1e-13)
    back = inv(y, **kw)
    assert isinstance(back, np.ndarray) and back.shape == x.shape
    np.testing.assert_allclose(back, x, atol=1e-10)


@pytest.mark.parametrize("fwd,inv,kw", PAIRS, ids=PAIR_IDS)
def test_round_trip_tensor_keeps_kind_dtype_and_grad(fwd, inv, kw):
    x = torch.linspace(-6, 6, 12, dtype=torch.float64).reshape(3, 4).requires_grad_(True)
    y = fwd(x, **kw)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64 and y.shape == x.shape
    expected = torch.tensor([[_closed_forward(fwd, float(v), kw) for v in row] for row in x.detach()],
                            dtype=torch.float64)
    torch.testing.assert_close(y.detach(), expected, rtol=1e-13, atol=0)
    back = inv(y, **kw)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float64
    torch.testing.assert_close(back.detach(), x.detach(), rtol=0, atol=1e-10)
    # the transform is differentiable: d/dx of the forward map in closed form
    (g,) = torch.autograd.grad(y.sum(), x)
    if fwd is T.norm2exp:
        dg = y.detach()
    else:
        s = torch.sigmoid(x.detach())
        dg = kw.get("max_val", 1 if fwd is T.norm2alpha else 20) * s * (1 - s)
    torch.testing.assert_close(g, dg, rtol=1e-12, atol=1e-300)


def test_float32_tensor_stays_float32():
    x = torch.tensor([0.3, -2.0], dtype=torch.float32)
    for fn in (T.norm2alpha, T.norm2beta, T.norm2exp):
        assert fn(x).dtype == torch.float32


def test_integer_and_numpy_scalar_inputs_give_floats():
    assert T.norm2alpha(0) == 0.5 and type(T.norm2alpha(0)) is float
    assert T.norm2beta(0) == 10.0 and type(T.norm2beta(0)) is float
    assert T.norm2beta(0, max_val=7) == 3.5
    y = T.norm2alpha(np.float64(1.0))
    assert type(y) is float and y == pytest.approx(1 / (1 + math.exp(-1)))
    assert T.alpha2norm(0.5) == 0.0
    assert T.beta2norm(10.0) == pytest.approx(0.0, abs=1e-15)
    assert T.beta2norm(2.0, max_val=4) == pytest.approx(0.0, abs=1e-15)
    assert T.exp2norm(1.0) == 0.0


def test_inverse_closed_forms():
    assert T.alpha2norm(0.8) == pytest.approx(math.log(0.8 / 0.2), rel=1e-14)
    assert T.beta2norm(5.0) == pytest.approx(math.log(5.0 / 15.0), rel=1e-14)
    assert T.beta2norm(5.0, max_val=8) == pytest.approx(math.log(5.0 / 3.0), rel=1e-14)
    assert T.exp2norm(3.0) == pytest.approx(math.log(3.0), rel=1e-14)


def test_extreme_values_are_finite_and_bounded():
    big = np.array([-800.0, -40.0, 40.0, 800.0])
    a = T.norm2alpha(big)
    assert np.all(np.isfinite(a)) and np.all((a >= 0) & (a <= 1))
    assert a[0] == pytest.approx(0.0, abs=1e-300) and a[-1] == 1.0
    b = T.norm2beta(big)
    assert np.all(np.isfinite(b)) and b[-1] == 20.0 and b[0] >= 0
    # numpy and torch agree on the tails
    np.testing.assert_allclose(T.norm2alpha(big), T.norm2alpha(torch.from_numpy(big)).numpy(), rtol=1e-15)
    # the boundary of the natural range maps to +-inf, not NaN
    assert T.alpha2norm(0.0) == -math.inf and T.alpha2norm(1.0) == math.inf
    assert T.beta2norm(20.0) == math.inf


def test_identity_and_registries():
    x = np.array([1.5, -2.0])
    assert T.identity(x) is x
    assert T.TRANSFORMS["alpha"] is T.norm2alpha and T.TRANSFORMS["beta"] is T.norm2beta
    assert T.TRANSFORMS["exp"] is T.norm2exp and T.TRANSFORMS["identity"] is T.identity
    for fwd, inv in [(T.norm2alpha, T.alpha2norm), (T.norm2beta, T.beta2norm), (T.norm2exp, T.exp2norm),
                     (T.identity, T.identity)]:
        assert T.inverse_of(fwd) is inv
    with pytest.raises(ValueError, match="no known inverse"):
        T.inverse_of(lambda v: v)


def test_exports_and_pyem_import_path():
    from torchem.utils import math as um

    for name in ("norm2alpha", "alpha2norm", "norm2beta", "beta2norm", "norm2exp", "exp2norm"):
        assert getattr(um, name) is getattr(T, name)
        assert getattr(torchem, name) is getattr(T, name)
    assert um.norm2beta(np.array([0.0]), max_val=6)[0] == 3.0
