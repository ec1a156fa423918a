"""Data coding: numbers stay numbers, option codes, missed trials, row order, parameter names, option checks.

Each test here is a case where a realistic input used to give a wrong result
without a word (or crash deep inside a fit); now it is refused with a message
that says where and what, or handled by a documented rule.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from torchem import EMModel, SubjectBatch, norm2alpha, norm2beta
from torchem.evidence import pseudo_r2
from torchem.models.bayes import bayes_fit
from torchem.models.glm import glm_ar_fit
from torchem.models.rl import rw1a1b_fit, rw4a1b_fit
from torchem.models.twostep import hybrid_mbmf_fit

from conftest import lists_to_dataframe, simulate_bandit

COLS = dict(columns=["choice", "reward"], block="block", trial="trial", device="cpu")


def _df(n=4, nblocks=2, ntrials=12, seed=0, text=True):
    _, _, data = simulate_bandit(n, nblocks=nblocks, ntrials=ntrials, seed=seed)
    df = lists_to_dataframe(data, subject_ids=[f"s{i}" for i in range(n)])
    if text:
        df["choice"] = np.where(df["choice"] == 1, "B", "A")
    return df


def _csv(df: pd.DataFrame, sep=",") -> pd.DataFrame:
    """``df`` written and read back as a CSV file, as a user's data arrive."""
    buf = io.StringIO()
    df.to_csv(buf, index=False, sep=sep)
    return pd.read_csv(io.StringIO(buf.getvalue()), sep=sep)


# --------------------------------------------------------- 1. numbers stay numbers
def test_dots_in_a_reward_column_are_refused_with_subject_row_and_value():
    df = _df().astype({"reward": object})
    df.loc[30, "reward"] = "."
    df.loc[40, "reward"] = "."
    read = _csv(df)
    assert read["reward"].dtype.kind not in "if"  # pandas reads the column as text
    with pytest.raises(ValueError, match=r"subject 's1': field 'reward' must hold numbers but has the text '\.' "
                                         r"at data row 31 \(line 32 .*na_values"):
        EMModel(read, rw1a1b_fit, **COLS)


@pytest.mark.parametrize("words", [("loss", "win"), ("no", "yes")])
def test_text_rewards_are_refused(words):
    df = _df()
    df["reward"] = np.where(df["reward"] > 0.5, words[1], words[0])
    with pytest.raises(ValueError, match=r"subject 's0': field 'reward' must hold numbers but has the text "
                                         rf"'{words[0] if df['reward'].iloc[0] == words[0] else words[1]}' at data row 1"):
        EMModel(df, rw1a1b_fit, **COLS)


def test_rewards_given_as_text_numbers_keep_their_values():
    df = _df()
    df["reward"] = np.where(df["reward"] > 0.5, 1, -1)
    as_text = df.astype({"reward": str})
    assert set(as_text["reward"]) == {"-1", "1"}
    coded = EMModel(as_text, rw1a1b_fit, **COLS).batch
    numeric = EMModel(df, rw1a1b_fit, **COLS).batch
    torch.testing.assert_close(coded.fields["reward"], numeric.fields["reward"].to(coded.fields["reward"].dtype))
    assert set(coded.fields["reward"][coded.mask].tolist()) == {-1.0, 1.0}
    assert coded.categories == {"choice": ["A", "B"]}


def test_a_third_choice_label_is_named_with_its_own_subject():
    df = _df()
    df.loc[(df.subject == "s2") & (df.block == 2) & (df.trial == 5), "choice"] = "C"
    row = int(np.flatnonzero(df["choice"] == "C")[0])
    with pytest.raises(ValueError, match=rf"subject 's2': field 'choice' has the label 'C' at data row {row + 1} "
                                         r".*takes 2 options and the data have 3 labels: 'A' \(\d+ trials\), "
                                         r"'B' \(\d+ trials\), 'C' \(1 trials\)"):
        EMModel(df, rw1a1b_fit, **COLS)


def test_a_dot_among_choice_labels_is_named_not_its_code():
    df = _df()
    df.loc[(df.subject == "s3") & (df.trial == 7), "choice"] = "."
    with pytest.raises(ValueError, match=r"subject 's3': field 'choice' has the label '\.' at data row \d+ .*"
                                         r"na_values"):
        EMModel(df, rw1a1b_fit, **COLS)


def test_text_in_a_field_the_model_does_not_declare_categorical():
    df = _df()
    with pytest.raises(ValueError, match=r"field 'choice' must hold numbers but has the text 'A'|"
                                         r"field 'choice' must hold numbers but has the text 'B'"):
        SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial")
    batch = SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial",
                                        categorical=["choice"])
    assert batch.categories == {"choice": ["A", "B"]}

    def bias_fit(params, choices, rewards, mask=None, output="nll"):
        c = choices.to(params.dtype)
        ll = c * torch.nn.functional.logsigmoid(params[:, :1, None]) + \
            (1 - c) * torch.nn.functional.logsigmoid(-params[:, :1, None])
        return -(ll * mask).sum((1, 2))

    with pytest.raises(ValueError, match="must hold numbers"):
        EMModel(df, bias_fit, ["p"], **COLS)
    model = EMModel(df, bias_fit, ["p"], categorical=["choice"], **COLS)
    assert model.batch.categories == {"choice": ["A", "B"]}
    # a ready batch whose numeric field was label-coded is refused by a model that takes it as a number
    wrong = SubjectBatch.from_dataframe(df.assign(reward=np.where(df.reward > 0.5, "win", "loss")),
                                        columns=["choice", "reward"], block="block", trial="trial",
                                        categorical=["choice", "reward"])
    with pytest.raises(ValueError, match=r"\['reward'\] were coded from text labels"):
        EMModel(wrong, rw1a1b_fit, device="cpu")


def test_numbers_and_labels_mixed_in_one_choice_field():
    df = _df().astype({"choice": object})
    df.loc[5, "choice"] = 1
    with pytest.raises(ValueError, match=r"field 'choice' mixes numbers and text labels: 1 at data row 6"):
        EMModel(df, rw1a1b_fit, **COLS)


def test_options_offered_and_chosen_share_one_label_coding():
    sim = rw4a1b_fit.simulate(np.tile([[5.0, 0.5, 0.5, 0.5, 0.5]], (3, 1)), seed=0)
    names = np.array(["fractal_a", "fractal_b", "fractal_c", "fractal_d"])
    numeric = [[sim[k][i] for k in rw4a1b_fit.inputs] for i in range(3)]
    labelled = [[names[d] if k in ("choices", "option_left", "option_right") else d
                 for k, d in zip(rw4a1b_fit.inputs, subj)] for subj in numeric]
    # one subject never sees fractal_d on the left: a separate coding per field would shift its codes
    a = EMModel(labelled, rw4a1b_fit, device="cpu").batch
    b = EMModel(numeric, rw4a1b_fit, device="cpu").batch
    for name in ("choices", "option_left", "option_right"):
        torch.testing.assert_close(a.fields[name], b.fields[name])
        assert a.categories[name] == list(names)


def test_two_step_states_share_the_coding_of_first_stage_actions():
    sim = hybrid_mbmf_fit.simulate(np.tile([[3.0, 3.0, 0.5, 0.5, 0.5, 0.5, 0.1]], (2, 1)), ntrials=40, seed=0)
    data = [[np.where(sim["choices1"][i] == 1, "right", "left"), np.where(sim["states2"][i] == 1, "pink", "blue"),
             sim["choices2"][i], sim["rewards"][i]] for i in range(2)]
    with pytest.raises(ValueError, match=r"fields \['choices1', 'states2'\] share one coding of the options, but "
                                         r"together they hold 4 labels \['blue', 'left', 'pink', 'right'\]"):
        EMModel(data, hybrid_mbmf_fit, device="cpu")
    for d in data:  # name each state by the action that commonly leads to it: accepted
        d[1] = np.where(d[1] == "pink", "right", "left")
    batch = EMModel(data, hybrid_mbmf_fit, device="cpu").batch
    assert batch.categories["states2"] == batch.categories["choices1"] == ["left", "right"]
    np.testing.assert_array_equal(batch.fields["states2"].numpy(), sim["states2"])


# ---------------------------------------------------------- 2. choice codes, missed trials
def test_choices_coded_1_2_get_the_exact_instruction_and_first_option_accepts_them():
    df = _df(text=False)
    one_based = df.assign(choice=df["choice"] + 1)
    with pytest.raises(ValueError, match=r"field 'choice' has value 2 at data row \d+ .*expected option codes 0\.\.1; "
                                         r"the codes look 1-based \(1\.\.2\): subtract 1 from 'choice' "
                                         r"\(first_option=1; command line: --first-option 1"):
        EMModel(one_based, rw1a1b_fit, **COLS)
    shifted = EMModel(one_based, rw1a1b_fit, first_option=1, **COLS).batch
    ref = EMModel(df, rw1a1b_fit, **COLS).batch
    torch.testing.assert_close(shifted.fields["choice"], ref.fields["choice"])
    torch.testing.assert_close(shifted.fields["reward"], ref.fields["reward"])


def test_a_binary_response_coded_1_2_names_what_0_and_1_mean():
    from torchem.models.sdt import sdt_fit
    sim = sdt_fit.simulate(np.array([[1.0, 0.0], [2.0, 0.2]]), seed=0)
    data = [[sim["is_old"][i], sim["resp_old"][i] + 1] for i in range(2)]
    with pytest.raises(ValueError, match=r"field 'resp_old' has value 2 .*\(1 = responded old, 0 = responded new\); "
                                         r"the codes look 1-based"):
        EMModel(data, sdt_fit, device="cpu")


def _rw_nll(batch, x):
    return rw1a1b_fit(x, *batch.data, mask=batch.mask)


def test_missed_choices_are_skipped_in_place_with_missing_skip():
    df = _df(text=False)
    missed = (df.subject == "s1") & (df.block == 1) & (df.trial.isin([4, 9]))
    gappy = df.astype({"choice": float})
    gappy.loc[missed, "choice"] = np.nan
    gappy.loc[missed, "reward"] = np.nan  # no choice, no reward
    first_row = int(np.flatnonzero(missed)[0])
    with pytest.raises(ValueError, match=rf"subject 's1': field 'choice' has a missing value \(NaN or empty\) at "
                                         rf"data row {first_row + 1} .*missing='skip'"):
        EMModel(gappy, rw1a1b_fit, **COLS)
    skipped = EMModel(gappy, rw1a1b_fit, missing="skip", **COLS).batch
    assert skipped.trial_shape == (2, 12) and skipped.fields["choice"].dtype == torch.long
    assert skipped.n_obs.tolist() == [24, 22, 24, 24]
    assert skipped.mask[1, 0].tolist() == [t not in (3, 8) for t in range(12)]  # the holes keep their places
    # the likelihood skips them exactly: the same as removing the two trials
    removed = EMModel(df[~missed], rw1a1b_fit, **COLS).batch
    x = torch.tensor([[1.0, 0.3], [0.5, -0.2], [0.0, 0.1], [-0.5, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(_rw_nll(skipped, x), _rw_nll(removed, x), rtol=0, atol=1e-12)
    full = EMModel(df, rw1a1b_fit, **COLS).batch
    assert float((_rw_nll(full, x) - _rw_nll(skipped, x))[1]) > 0.5
    # the same through a mask column, with anything (text, NaN) on the skipped trials
    flagged = df.assign(valid=(~missed).astype(int)).astype({"reward": object})
    flagged.loc[missed, "reward"] = "."
    masked = EMModel(flagged, rw1a1b_fit, mask="valid", **COLS).batch
    torch.testing.assert_close(masked.mask, skipped.mask)
    torch.testing.assert_close(_rw_nll(masked, x), _rw_nll(skipped, x), rtol=0, atol=0)


def test_missed_trials_from_lists_and_bad_mask_values():
    _, _, data = simulate_bandit(3, nblocks=1, ntrials=10, seed=3)
    data[0][0] = data[0][0].astype(float)
    data[0][0][0, 2] = np.nan
    batch = EMModel(data, rw1a1b_fit, missing="skip", device="cpu").batch
    assert batch.n_obs.tolist() == [9, 10, 10] and not bool(batch.mask[0, 0, 2])
    df = _df(text=False).assign(valid=1)
    df.loc[7, "valid"] = 2
    with pytest.raises(ValueError, match=r"subject 's0': mask column 'valid' must be 1/True .* got 2 at data row 8"):
        EMModel(df, rw1a1b_fit, mask="valid", **COLS)
    everything = df.assign(valid=np.where(df.subject == "s2", 0, 1))
    with pytest.raises(ValueError, match=r"subject 's2': every trial is missing or masked"):
        EMModel(everything, rw1a1b_fit, mask="valid", **COLS)


@pytest.mark.parametrize("fit", [bayes_fit, glm_ar_fit])
def test_skipping_is_refused_where_the_model_does_not_define_it(fit):
    with pytest.raises(ValueError, match=r"does not define what happens on a skipped trial"):
        EMModel([[np.zeros(5), np.zeros(5)]], fit, missing="skip", device="cpu")


def test_every_model_that_declares_responses_skips_a_masked_trial_exactly():
    """A hole in the middle of a sequence gives the likelihood of the data without that trial."""
    from torchem.models import MODELS
    rng = np.random.default_rng(0)
    for name, fit in MODELS.items():
        if not fit.responses:
            continue
        x = torch.as_tensor(rng.standard_normal((3, len(fit.param_names))) * 0.5)
        nat = torch.stack([t(x[:, j]) for j, t in enumerate(fit.param_xform)], -1).numpy()
        sim = fit.simulate(nat, seed=1)
        batch = SubjectBatch.from_lists([[sim[k][i] for k in fit.inputs] for i in range(3)], names=fit.inputs)
        T = batch.trial_shape[-1]
        t = T // 2
        keep = [i for i in range(T) if i != t] + [t]
        mask_axis = batch.mask.dim() - 1
        hole = batch.mask.clone()
        hole[..., t] = False
        end = batch.mask.clone()
        end[..., T - 1] = False
        removed = [d.index_select(mask_axis, torch.tensor(keep)) for d in batch.data]
        torch.testing.assert_close(fit(x, *batch.data, mask=hole), fit(x, *removed, mask=end), rtol=0, atol=1e-10,
                                   msg=name)


# ------------------------------------------------------------------- 3. row order
def test_shuffled_rows_with_only_block_are_refused():
    df = _df(text=False)
    shuffled = df.sample(frac=1.0, random_state=0)
    with pytest.raises(ValueError, match=r"subject 's\d', block \d: the rows are not in the order of column 'trial' "
                                         r"\(trial \d+ is followed by \d+ at data row \d+ .*trial='trial'"):
        EMModel(shuffled, rw1a1b_fit, columns=["choice", "reward"], block="block", device="cpu")
    ref = EMModel(df, rw1a1b_fit, **COLS).batch
    sorted_ = EMModel(shuffled, rw1a1b_fit, **COLS).batch
    torch.testing.assert_close(sorted_.fields["reward"], ref.fields["reward"])


def test_a_trial_counter_in_order_is_used_and_no_counter_warns():
    df = _df(text=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = EMModel(df, rw1a1b_fit, columns=["choice", "reward"], block="block", device="cpu").batch
        trusted = EMModel(df.drop(columns="trial"), rw1a1b_fit, columns=["choice", "reward"], block="block",
                          trial=False, device="cpu").batch
    assert found.warnings == [] and trusted.warnings == []
    ref = EMModel(df, rw1a1b_fit, **COLS).batch
    torch.testing.assert_close(found.fields["reward"], ref.fields["reward"])
    torch.testing.assert_close(trusted.fields["reward"], ref.fields["reward"])
    with pytest.warns(UserWarning, match=r"no trial column given or found"):
        batch = EMModel(df.drop(columns="trial"), rw1a1b_fit, columns=["choice", "reward"], block="block",
                        device="cpu").batch
    assert len(batch.warnings) == 1 and "order of the table" in batch.warnings[0]
    # a duplicated trial number within a block is caught by the counter too
    dup = df.copy()
    dup.loc[3, "trial"] = dup.loc[2, "trial"]
    with pytest.raises(ValueError, match=r"not in the order of column 'trial'"):
        EMModel(dup, rw1a1b_fit, columns=["choice", "reward"], block="block", device="cpu")


# --------------------------------------------------------- 4. parameter names
def test_renamed_parameters_keep_their_transforms():
    _, _, data = simulate_bandit(10, nblocks=2, ntrials=24, seed=4)
    default = EMModel(data, rw1a1b_fit, device="cpu")
    renamed = EMModel(data, rw1a1b_fit, param_names=["b", "a"], device="cpu")
    assert renamed.model.param_xform == default.model.param_xform
    assert renamed.get_param_transform("b") is norm2beta and renamed.get_param_transform("a") is norm2alpha
    renamed.fit(verbose=0, mstep_maxit=5)
    natural = renamed.subject_params().to_numpy()
    np.testing.assert_allclose(natural, renamed.get_outfit()["params"], rtol=0, atol=1e-12)
    assert (natural[:, 1] > 0).all() and (natural[:, 1] < 1).all()


@pytest.mark.parametrize("names", [["beta"], ["beta", "alpha", "extra"], ["a", "a"]])
def test_wrong_parameter_names_are_an_error(names):
    _, _, data = simulate_bandit(3, nblocks=1, ntrials=10, seed=5)
    with pytest.raises(ValueError, match=r"rw1a1b_fit has 2 parameters \(beta, alpha\) but \d parameter names|unique"):
        EMModel(data, rw1a1b_fit, param_names=names, device="cpu")
    with pytest.raises(ValueError, match=r"has 2 parameters \(beta, alpha\) but 1 parameter transforms"):
        EMModel(data, rw1a1b_fit, param_xform=[norm2beta], device="cpu")


def test_a_custom_model_with_too_few_names_fails_at_once():
    def two_param_fit(params, choices, rewards, mask=None, output="nll"):
        return (params[:, 0] ** 2 + params[:, 1] ** 2) * mask.sum((1, 2))

    _, _, data = simulate_bandit(3, nblocks=1, ntrials=10, seed=6)
    with pytest.raises(ValueError, match=r"fit_func fails with the 1 parameters named \['a'\] \(IndexError"):
        EMModel(data, two_param_fit, param_names=["a"], device="cpu")


# --------------------------------------------------------------- 5. options
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_half_precision_is_refused(dtype):
    _, _, data = simulate_bandit(2, nblocks=1, ntrials=10, seed=7)
    with pytest.raises(ValueError, match=r"use torch\.float64 \(the default\) or torch\.float32"):
        EMModel(data, rw1a1b_fit, device="cpu", dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_how_to_pick_the_cpu():
    from torchem.api import resolve_device
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=r"CUDA is not available on this machine .* use device='cpu'"):
            resolve_device(device)
    with pytest.raises(ValueError, match=r"unknown device 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("noptions", [1, 0, 2.5])
def test_pseudo_r2_needs_two_options(noptions):
    with pytest.raises(ValueError, match=r"noptions must be an integer >= 2"):
        pseudo_r2(torch.ones(3), torch.full((3,), 10), noptions)
    assert pseudo_r2(torch.ones(3), torch.full((3,), 10), 2) == pytest.approx(1 - 1 / (10 * np.log(2)))


def test_recovery_from_a_model_of_recoded_data_simulates_in_the_model_coding():
    df = _df(n=8, text=False)
    gappy = df.assign(choice=df["choice"] + 1.0)
    gappy.loc[3, "choice"] = np.nan
    model = EMModel(gappy, rw1a1b_fit, first_option=1, missing="skip", **COLS)
    true = np.column_stack([np.full(8, 5.0), np.full(8, 0.4)])
    rec = model.recover(true, nblocks=2, ntrials=12, seed=0, fit_kwargs={"mstep_maxit": 3})
    assert rec["estimated_params"].shape == (8, 2) and rec["fit_result"].n_obs.tolist() == [24] * 8
