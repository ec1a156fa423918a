"""Rescorla-Wagner likelihoods and simulators against a plain per-subject reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchem import EMModel, SubjectBatch
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate, rw2a1b_fit, rw2a1b_simulate
from torchem.transforms import alpha2norm, beta2norm, norm2alpha, norm2beta

from conftest import ragged_bandit_data


def reference_nll(beta, alpha_pos, alpha_neg, choices, rewards):
    """Negative log-likelihood of one subject, written as plainly as possible.

    ``choices``/``rewards``: list of blocks, each a 1-D sequence of trials.
    Values reset to 0.5 at the start of every block; softmax over two options;
    the learning rate is ``alpha_pos`` when the prediction error is positive,
    else ``alpha_neg``.
    """
    nll = 0.0
    for block_c, block_r in zip(choices, rewards):
        v = [0.5, 0.5]
        for c, r in zip(block_c, block_r):
            c = int(c)
            e = [math.exp(beta * v[0]), math.exp(beta * v[1])]
            nll -= math.log(e[c] / (e[0] + e[1]))
            pe = float(r) - v[c]
            lr = alpha_pos if pe > 0 else alpha_neg
            v[c] = v[c] + lr * pe
    return nll


def _natural(params_norm):
    p = 20.0 / (1.0 + np.exp(-params_norm[:, 0]))
    lrs = 1.0 / (1.0 + np.exp(-params_norm[:, 1:]))
    return p, lrs


def _random_ragged(model_name, seed, continuous):
    data = ragged_bandit_data(seed=seed, blocks=(3, 1, 4, 2), ntrials=15, model=model_name)
    rng = np.random.default_rng(seed + 50)
    if continuous:
        data = [[c, rng.normal(0.5, 1.0, size=r.shape)] for c, r in data]
    # one subject whose blocks are shorter than the others
    data.append([data[2][0][:, :9], data[2][1][:, :9]])
    return data


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("continuous", [False, True])
def test_rw1a1b_matches_reference(seed, continuous):
    data = _random_ragged("rw1a1b", seed, continuous)
    batch = SubjectBatch.from_lists(data, names=["choices", "rewards"])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch.n_subjects, 2, generator=gen, dtype=torch.float64) * 1.5
    nll = rw1a1b_fit(x, *batch.data, mask=batch.mask)
    assert nll.shape == (batch.n_subjects,) and nll.dtype == torch.float64
    beta, lrs = _natural(x.numpy())
    ref = [reference_nll(beta[i], lrs[i, 0], lrs[i, 0], c, r) for i, (c, r) in enumerate(data)]
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rw2a1b_matches_reference(seed):
    data = _random_ragged("rw2a1b", seed, continuous=(seed == 2))
    batch = SubjectBatch.from_lists(data, names=["choices", "rewards"])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch.n_subjects, 3, generator=gen, dtype=torch.float64) * 1.5
    # make the two learning rates clearly different
    x[:, 1] += 1.5
    x[:, 2] -= 1.5
    nll = rw2a1b_fit(x, *batch.data, mask=batch.mask)
    beta, lrs = _natural(x.numpy())
    ref = [reference_nll(beta[i], lrs[i, 0], lrs[i, 1], c, r) for i, (c, r) in enumerate(data)]
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-10, atol=1e-8)
    # and it is really a different model from rw1a1b with either rate
    one_rate = [reference_nll(beta[i], lrs[i, 0], lrs[i, 0], c, r) for i, (c, r) in enumerate(data)]
    assert np.abs(np.asarray(one_rate) - nll.numpy()).min() > 1e-3


def test_rw2a1b_with_equal_rates_is_rw1a1b():
    data = _random_ragged("rw1a1b", 5, continuous=True)
    batch = SubjectBatch.from_lists(data, names=["choices", "rewards"])
    x2 = torch.randn(batch.n_subjects, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x3 = torch.cat([x2, x2[:, 1:]], 1)
    torch.testing.assert_close(rw2a1b_fit(x3, *batch.data, mask=batch.mask),
                               rw1a1b_fit(x2, *batch.data, mask=batch.mask), rtol=1e-14, atol=1e-12)


@pytest.mark.parametrize("fit,P", [(rw1a1b_fit, 2), (rw2a1b_fit, 3)], ids=["rw1a1b", "rw2a1b"])
def test_padded_trials_never_change_the_nll(fit, P):
    batch = SubjectBatch.from_lists(_random_ragged("rw1a1b", 3, continuous=False), names=["choices", "rewards"])
    assert not bool(batch.mask.all())
    x = torch.randn(batch.n_subjects, P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    clean = fit(x, *batch.data, mask=batch.mask)
    clean_all = fit(x, *batch.data, mask=batch.mask, output="all")
    rng = np.random.default_rng(9)
    pad = ~batch.mask
    for _ in range(3):
        c = batch.fields["choices"].clone()
        r = batch.fields["rewards"].clone()
        c[pad] = torch.from_numpy(rng.integers(0, 2, size=int(pad.sum())))
        r[pad] = torch.from_numpy(rng.normal(0, 1e3, size=int(pad.sum())))
        dirty = fit(x, c, r, mask=batch.mask)
        torch.testing.assert_close(dirty, clean, rtol=0, atol=1e-12)
        dirty_all = fit(x, c, r, mask=batch.mask, output="all")
        m = batch.mask
        torch.testing.assert_close(dirty_all["ch_prob"][m], clean_all["ch_prob"][m], rtol=0, atol=1e-12)
        torch.testing.assert_close(dirty_all["PE"], clean_all["PE"], rtol=0, atol=1e-12)
    # gradients do not see the padding either
    xg = x.clone().requires_grad_(True)
    (g_clean,) = torch.autograd.grad(fit(xg, *batch.data, mask=batch.mask).sum(), xg)
    (g_dirty,) = torch.autograd.grad(fit(xg, c, r, mask=batch.mask).sum(), xg)
    torch.testing.assert_close(g_dirty, g_clean, rtol=0, atol=1e-10)


def test_nan_in_padded_trials_does_not_change_the_nll():
    batch = SubjectBatch.from_lists(_random_ragged("rw1a1b", 4, continuous=False), names=["choices", "rewards"])
    x = torch.randn(batch.n_subjects, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    clean = rw1a1b_fit(x, *batch.data, mask=batch.mask)
    r = batch.fields["rewards"].clone()
    r[~batch.mask] = float("nan")
    torch.testing.assert_close(rw1a1b_fit(x, batch.fields["choices"], r, mask=batch.mask), clean)


def test_two_d_input_equals_single_block_three_d_input():
    rng = np.random.default_rng(0)
    S, T = 6, 30
    c = torch.from_numpy(rng.integers(0, 2, size=(S, T)))
    r = torch.from_numpy(rng.random((S, T)))
    mask = torch.ones(S, T, dtype=torch.bool)
    mask[2, 20:] = False
    x = torch.randn(S, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for fit, xx in ((rw1a1b_fit, x), (rw2a1b_fit, torch.cat([x, -x[:, 1:]], 1))):
        two = fit(xx, c, r, mask=mask)
        three = fit(xx, c[:, None], r[:, None], mask=mask[:, None])
        torch.testing.assert_close(two, three, rtol=0, atol=0)
        all2 = fit(xx, c, r, mask=mask, output="all")
        all3 = fit(xx, c[:, None], r[:, None], mask=mask[:, None], output="all")
        for k in ("EV", "PE", "ch_prob"):
            torch.testing.assert_close(all2[k], all3[k].squeeze(1), rtol=0, atol=0)
    # no mask means every trial counts
    torch.testing.assert_close(rw1a1b_fit(x, c, r), rw1a1b_fit(x, c, r, mask=torch.ones_like(mask)))


@pytest.mark.parametrize("fit,P", [(rw1a1b_fit, 2), (rw2a1b_fit, 3)], ids=["rw1a1b", "rw2a1b"])
def test_output_all_shapes_and_consistency(fit, P):
    data = _random_ragged("rw1a1b", 6, continuous=False)
    batch = SubjectBatch.from_lists(data, names=["choices", "rewards"])
    S, (B, T) = batch.n_subjects, batch.trial_shape
    x = torch.randn(S, P, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = fit(x, *batch.data, mask=batch.mask, output="all")
    for k in ("params", "nll", "EV", "PE", "ch_prob"):
        assert k in out
    assert out["params"].shape == (S, P)
    assert out["nll"].shape == (S,)
    assert out["EV"].shape == (S, B, T + 1, 2)
    assert out["PE"].shape == (S, B, T)
    assert out["ch_prob"].shape == (S, B, T, 2)
    # natural parameters
    torch.testing.assert_close(out["params"][:, 0], 20 * torch.sigmoid(x[:, 0]), rtol=1e-14, atol=0)
    torch.testing.assert_close(out["params"][:, 1:], torch.sigmoid(x[:, 1:]), rtol=1e-14, atol=0)
    # probabilities are proper and the nll is the log-probability of the chosen options
    torch.testing.assert_close(out["ch_prob"].sum(-1), torch.ones(S, B, T, dtype=torch.float64),
                               rtol=0, atol=1e-14)
    assert (out["ch_prob"] > 0).all() and (out["ch_prob"] < 1).all()
    chosen = out["ch_prob"].gather(-1, batch.fields["choices"].unsqueeze(-1)).squeeze(-1)
    nll_from_probs = -(chosen.log() * batch.mask).flatten(1).sum(1)
    torch.testing.assert_close(nll_from_probs, out["nll"], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(out["nll"], fit(x, *batch.data, mask=batch.mask), rtol=0, atol=0)
    # every block starts at 0.5 / 0.5; PE is zero on padded trials
    assert (out["EV"][:, :, 0] == 0.5).all()
    assert (out["PE"][~batch.mask] == 0).all()
    # the PE is reward minus the value of the chosen option before the update
    ev_chosen = out["EV"][:, :, :-1].gather(-1, batch.fields["choices"].unsqueeze(-1)).squeeze(-1)
    pe = (batch.fields["rewards"] - ev_chosen)[batch.mask]
    torch.testing.assert_close(out["PE"][batch.mask], pe, rtol=0, atol=1e-14)
    # the "all" output is differentiable like the nll
    xg = x.clone().requires_grad_(True)
    fit(xg, *batch.data, mask=batch.mask, output="all")["nll"].sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_output_all_for_two_d_data_has_no_block_axis():
    rng = np.random.default_rng(1)
    c = torch.from_numpy(rng.integers(0, 2, size=(4, 11)))
    r = torch.from_numpy(rng.random((4, 11)))
    out = rw1a1b_fit(torch.zeros(4, 2, dtype=torch.float64), c, r, output="all")
    assert out["EV"].shape == (4, 12, 2)
    assert out["PE"].shape == (4, 11)
    assert out["ch_prob"].shape == (4, 11, 2)
    # beta = 10, equal values on trial 0: both options at 0.5
    assert (out["ch_prob"][:, 0] == 0.5).all()


# ----------------------------------------------------------------- simulators
@pytest.mark.parametrize("simulate,P", [(rw1a1b_simulate, 2), (rw2a1b_simulate, 3)],
                         ids=["rw1a1b", "rw2a1b"])
def test_simulator_keys_shapes_and_reproducibility(simulate, P):
    rng = np.random.default_rng(0)
    params = np.column_stack([rng.uniform(1, 10, 7)] + [rng.uniform(0.1, 0.9, 7) for _ in range(P - 1)])
    a = simulate(params, nblocks=3, ntrials=17, seed=42)
    b = simulate(params, nblocks=3, ntrials=17, seed=42)
    c = simulate(params, nblocks=3, ntrials=17, seed=43)
    assert set(a) >= {"params", "choices", "rewards", "EV", "PE", "ch_prob"}
    assert a["params"].shape == (7, P)
    np.testing.assert_array_equal(a["params"], params)
    assert a["choices"].shape == (7, 3, 17) and a["choices"].dtype.kind == "i"
    assert a["rewards"].shape == (7, 3, 17)
    assert a["EV"].shape == (7, 3, 18, 2)
    assert a["PE"].shape == (7, 3, 17)
    assert a["ch_prob"].shape == (7, 3, 17, 2)
    assert set(np.unique(a["choices"])) <= {0, 1}
    assert set(np.unique(a["rewards"])) <= {0.0, 1.0}
    np.testing.assert_allclose(a["ch_prob"].sum(-1), 1.0, atol=1e-15)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["choices"], c["choices"])
    # default design: 3 blocks of 24
    d = simulate(params, seed=1)
    assert d["choices"].shape == (7, 3, 24)


@pytest.mark.parametrize("fit,simulate,P", [(rw1a1b_fit, rw1a1b_simulate, 2), (rw2a1b_fit, rw2a1b_simulate, 3)],
                         ids=["rw1a1b", "rw2a1b"])
def test_simulator_trajectories_match_the_likelihood(fit, simulate, P):
    rng = np.random.default_rng(3)
    params = np.column_stack([rng.uniform(1, 10, 9)] + [rng.uniform(0.1, 0.9, 9) for _ in range(P - 1)])
    sim = simulate(params, nblocks=2, ntrials=20, seed=5)
    x = torch.from_numpy(np.column_stack([beta2norm(params[:, 0])] + [alpha2norm(params[:, j]) for j in range(1, P)]))
    out = fit(x, torch.from_numpy(sim["choices"]), torch.from_numpy(sim["rewards"]), output="all")
    np.testing.assert_allclose(out["params"].numpy(), params, rtol=1e-12)
    np.testing.assert_allclose(out["EV"].numpy(), sim["EV"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["PE"].numpy(), sim["PE"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["ch_prob"].numpy(), sim["ch_prob"], rtol=0, atol=1e-12)


def test_simulator_fixed_outcomes_and_reward_probabilities():
    params = np.array([[5.0, 0.3], [1.0, 0.7], [12.0, 0.5]])
    rng = np.random.default_rng(0)
    outcomes = rng.integers(0, 2, size=(2, 10, 2)).astype(float)
    sim = rw1a1b_simulate(params, nblocks=2, ntrials=10, outcomes=outcomes, seed=1)
    b_idx, t_idx = np.meshgrid(np.arange(2), np.arange(10), indexing="ij")
    for i in range(3):
        np.testing.assert_array_equal(sim["rewards"][i], outcomes[b_idx, t_idx, sim["choices"][i]])
    # deterministic payoffs: option A always pays, B never
    sim = rw1a1b_simulate(np.array([[5.0, 0.5]] * 50), nblocks=1, ntrials=30, reward_probs=(1.0, 0.0), seed=2)
    np.testing.assert_array_equal(sim["rewards"], (sim["choices"] == 0).astype(float))
    # learning agents prefer A by the end
    assert sim["choices"][:, 0, -10:].mean() < 0.2


def test_simulator_rejects_wrong_parameter_shape():
    with pytest.raises(ValueError, match=r"params must be \(subjects, 2\)"):
        rw1a1b_simulate(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"params must be \(subjects, 3\)"):
        rw2a1b_simulate(np.ones(3))


def test_models_declare_their_defaults():
    assert rw1a1b_fit.param_names == ["beta", "alpha"]
    assert rw2a1b_fit.param_names == ["beta", "alpha_pos", "alpha_neg"]
    assert rw1a1b_fit.inputs == rw2a1b_fit.inputs == ["choices", "rewards"]
    assert rw1a1b_fit.simulate is rw1a1b_simulate and rw2a1b_fit.simulate is rw2a1b_simulate
    assert len(rw2a1b_fit.param_xform) == 3


def test_rw2a1b_recovery_200_subjects():
    # 4 blocks x 24 trials, normalized N(0, 1) draws; benchmarks/recovery_table.py measured
    # beta 0.79, alpha_pos 0.64, alpha_neg 0.88 (alpha_pos is the one 96 trials pin down least)
    rng = np.random.default_rng(20)
    x = rng.standard_normal((200, 3))
    true = np.column_stack([norm2beta(x[:, 0]), norm2alpha(x[:, 1]), norm2alpha(x[:, 2])])
    model = EMModel([[np.array([0, 1]), np.array([0.0, 1.0])]], rw2a1b_fit, device="cpu")
    rec = model.recover(true, nblocks=4, ntrials=24, seed=21)
    r = dict(zip(rec["param_names"], rec["correlation"]))
    for p, thr in {"beta": 0.7, "alpha_pos": 0.5, "alpha_neg": 0.75}.items():
        assert r[p] >= thr, (p, r)
