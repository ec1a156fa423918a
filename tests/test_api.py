"""EMModel: the inputs it accepts, its accessors and its errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torchem import EMModel, SubjectBatch
from torchem.api import resolve_device
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate, rw2a1b_fit
from torchem.transforms import identity, norm2alpha, norm2beta

from conftest import lists_to_dataframe, ragged_bandit_data


@pytest.fixture(scope="module")
def ragged_data():
    return ragged_bandit_data(seed=31, blocks=(2, 4, 3, 4, 1))


def test_lists_dataframe_and_batch_inputs_agree(ragged_data):
    from_lists = EMModel(ragged_data, rw1a1b_fit, device="cpu")
    df = lists_to_dataframe(ragged_data, subject_ids=list(range(5)))
    df["choice"] = np.where(df["choice"] == 1, "B", "A")  # text labels, coded A=0, B=1
    from_df = EMModel(df, rw1a1b_fit, subject="subject", columns=["choice", "reward"], block="block",
                      trial="trial", device="cpu")
    batch = SubjectBatch.from_lists(ragged_data, names=["choices", "rewards"])
    from_batch = EMModel(batch, rw1a1b_fit, device="cpu")
    assert from_lists.batch.names == ["choices", "rewards"]  # the model's declared inputs
    assert from_df.batch.names == ["choice", "reward"]
    assert from_df.batch.categories == {"choice": ["A", "B"]}
    for m in (from_df, from_batch):
        for a, b in zip(m.batch.data, from_lists.batch.data):
            assert torch.equal(a, b)
        assert torch.equal(m.batch.mask, from_lists.batch.mask)
    assert from_lists.batch.fields["rewards"].dtype == torch.float64
    assert from_lists.device == torch.device("cpu") and from_lists.dtype == torch.float64
    text = repr(from_lists)
    assert "rw1a1b_fit" in text and "not fitted" in text and "5 subjects" in text
    assert from_lists.param_names == ["beta", "alpha"]
    assert from_lists.fit_func is rw1a1b_fit and from_lists.simulate_func is rw1a1b_simulate


def test_float32_dtype_is_honoured(ragged_data):
    model = EMModel(ragged_data, rw1a1b_fit, device="cpu", dtype=torch.float32)
    assert model.batch.fields["rewards"].dtype == torch.float32
    assert model.batch.fields["choices"].dtype == torch.long


def test_dataframe_requires_columns(ragged_data):
    df = lists_to_dataframe(ragged_data)
    with pytest.raises(ValueError, match="columns must name"):
        EMModel(df, rw1a1b_fit, device="cpu")


def test_input_names_for_list_data(ragged_data):
    model = EMModel(ragged_data, rw1a1b_fit, input_names=["c", "r"], device="cpu")
    assert model.batch.names == ["c", "r"]


def test_get_outfit_keys_and_shapes(small_model):
    out = small_model.get_outfit()
    assert set(out) >= {"params", "nll", "EV", "PE", "ch_prob", "choices", "rewards", "mask"}
    assert all(isinstance(v, np.ndarray) for v in out.values())
    assert out["params"].shape == (20, 2)
    assert out["nll"].shape == (20,)
    assert out["EV"].shape == (20, 4, 25, 2)
    assert out["PE"].shape == (20, 4, 24)
    assert out["ch_prob"].shape == (20, 4, 24, 2)
    assert out["mask"].shape == (20, 4, 24) and out["mask"].dtype == bool
    np.testing.assert_allclose(out["params"], small_model.result.natural_params().numpy(), rtol=1e-14)
    np.testing.assert_allclose(out["nll"], small_model.result.NLL.numpy(), rtol=1e-10)
    np.testing.assert_allclose(out["ch_prob"].sum(-1), 1.0, atol=1e-14)


def test_get_outfit_on_ragged_data(ragged_data):
    model = EMModel(ragged_data, rw1a1b_fit, device="cpu")
    res = model.fit(verbose=0, mstep_maxit=3)
    out = model.get_outfit()
    assert out["EV"].shape == (5, 4, 25, 2)
    np.testing.assert_array_equal(out["mask"], model.batch.mask.numpy())
    assert out["mask"].sum() == 14 * 24
    np.testing.assert_allclose(out["nll"], res.NLL.numpy(), rtol=1e-10)


def test_get_param_transform(small_model):
    assert small_model.get_param_transform("beta") is norm2beta
    assert small_model.get_param_transform("alpha") is norm2alpha
    assert small_model.get_param_transform(0) is norm2beta
    assert small_model.get_param_transform(1) is norm2alpha
    with pytest.raises(ValueError, match=r"unknown parameter 'gamma'; parameters are \['beta', 'alpha'\]"):
        small_model.get_param_transform("gamma")


def test_subject_params(small_model):
    df = small_model.subject_params()
    assert df.shape == (20, 2) and list(df.columns) == ["beta", "alpha"]
    assert df.equals(small_model.result.params_df())
    np.testing.assert_allclose(df["alpha"], 1 / (1 + np.exp(-small_model.result.m[:, 1].numpy())), rtol=1e-14)


def test_simulate(small_model):
    params = np.array([[3.0, 0.4], [8.0, 0.2]])
    sim = small_model.simulate(params, nblocks=2, ntrials=10, seed=4)
    ref = rw1a1b_simulate(params, nblocks=2, ntrials=10, seed=4)
    assert sim["choices"].shape == (2, 2, 10)
    for k in ref:
        np.testing.assert_array_equal(sim[k], ref[k])


def test_simulate_without_simulator_raises(ragged_data):
    def custom(params, choices, rewards, mask=None, output="nll"):
        return rw1a1b_fit(params, choices, rewards, mask=mask)

    model = EMModel(ragged_data, custom, param_names=["beta", "alpha"], device="cpu")
    with pytest.raises(RuntimeError, match="no simulate_func"):
        model.simulate(np.ones((2, 2)))
    with pytest.raises(RuntimeError, match="no simulate_func"):
        model.recover(np.ones((2, 2)), pr_inputs=["choices", "rewards"])
    with pytest.raises(ValueError, match="pr_inputs must name"):
        model.recover(np.ones((2, 2)))  # a custom function declares no inputs


def test_recover_requires_known_inputs(ragged_data):
    model = EMModel(ragged_data, rw1a1b_fit, device="cpu")
    with pytest.raises(ValueError, match=r"simulator output has no \['choice'\]"):
        model.recover(np.array([[3.0, 0.4], [5.0, 0.5]]), pr_inputs=["choice", "rewards"], nblocks=1, ntrials=5)


def test_library_transforms_are_kept_and_overridable(ragged_data):
    model = EMModel(ragged_data, rw2a1b_fit, device="cpu")
    assert model.param_names == ["beta", "alpha_pos", "alpha_neg"]
    assert model.model.param_xform == [norm2beta, norm2alpha, norm2alpha]
    renamed = EMModel(ragged_data, rw1a1b_fit, param_names=["b", "a"], device="cpu")  # transforms follow positions
    assert renamed.param_names == ["b", "a"] and renamed.model.param_xform == [norm2beta, norm2alpha]
    custom = EMModel(ragged_data, rw1a1b_fit, param_names=["b", "a"], param_xform=[identity, norm2alpha],
                     device="cpu")
    assert custom.get_param_transform("b") is identity and custom.get_param_transform("a") is norm2alpha


def test_methods_before_fit_raise(ragged_data):
    model = EMModel(ragged_data, rw1a1b_fit, device="cpu")
    for call in (model.compute_lme, model.get_outfit, model.subject_params, model.compute_pseudo_r2,
                 lambda: model.compute_integrated_bic(nsamples=10)):
        with pytest.raises(RuntimeError, match="not fitted yet"):
            call()


def test_fit_keeps_result_and_njobs_is_ignored(ragged_data):
    model = EMModel(ragged_data, rw1a1b_fit, device="cpu")
    res = model.fit(verbose=0, mstep_maxit=2, njobs=8)
    assert model.result is res and res.n_iter == 2
    assert "fitted" in repr(model) and "not fitted" not in repr(model)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected and resolve_device("auto").type == expected


def test_plot_recovery_returns_a_figure(small_model):
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    rng = np.random.default_rng(0)
    true = np.column_stack([rng.uniform(1, 10, 10), rng.uniform(0.1, 0.9, 10)])
    fig = small_model.plot_recovery({"true_params": true, "estimated_params": true + rng.normal(0, 0.1, true.shape),
                                     "param_names": ["beta", "alpha"]})
    assert len(fig.axes) >= 2
    import matplotlib.pyplot as plt

    plt.close(fig)
