"""SubjectBatch: building from lists and DataFrames, padding, masks and validation errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from torchem import EMModel, SubjectBatch
from torchem.models.rl import rw1a1b_fit

from conftest import lists_to_dataframe, ragged_bandit_data

NAMES = ["choices", "rewards"]


def _subject(rng, shape, text=False):
    c = rng.integers(0, 2, size=shape)
    r = rng.random(shape)
    if text:
        c = np.where(c == 1, "B", "A")
    return c, r


# ------------------------------------------------------------------ from_lists
def test_from_lists_numpy_tensors_and_lists_give_the_same_batch():
    rng = np.random.default_rng(0)
    subs = [_subject(rng, (3, 10)) for _ in range(4)]
    as_numpy = SubjectBatch.from_lists([[c, r] for c, r in subs], names=NAMES)
    as_torch = SubjectBatch.from_lists([[torch.from_numpy(c), torch.from_numpy(r)] for c, r in subs], names=NAMES)
    as_lists = SubjectBatch.from_lists([[c.tolist(), r.tolist()] for c, r in subs], names=NAMES)
    mixed = SubjectBatch.from_lists([[c.tolist(), torch.from_numpy(r)] if i % 2 else [torch.from_numpy(c), r]
                                     for i, (c, r) in enumerate(subs)], names=NAMES)
    for b in (as_numpy, as_torch, as_lists, mixed):
        assert b.names == NAMES and b.n_subjects == 4 and len(b) == 4
        assert b.trial_shape == (3, 10)
        assert b.fields["choices"].dtype == torch.long
        assert b.fields["rewards"].dtype == torch.float64
        assert b.mask.dtype == torch.bool and bool(b.mask.all())
        assert b.subject_ids == [0, 1, 2, 3]
        assert b.n_obs.tolist() == [30, 30, 30, 30]
        np.testing.assert_array_equal(b.fields["choices"].numpy(), np.stack([c for c, _ in subs]))
        np.testing.assert_array_equal(b.fields["rewards"].numpy(), np.stack([r for _, r in subs]))
    assert as_numpy.data[0] is as_numpy.fields["choices"]


def test_from_lists_default_names_ids_dtype_and_device():
    rng = np.random.default_rng(1)
    subs = [list(_subject(rng, (12,))) for _ in range(3)]
    b = SubjectBatch.from_lists(subs, subject_ids=["s1", "s2", "s3"], dtype=torch.float32, device="cpu")
    assert b.names == ["input0", "input1"]
    assert b.subject_ids == ["s1", "s2", "s3"]
    assert b.fields["input1"].dtype == torch.float32
    assert b.fields["input0"].dtype == torch.long
    assert b.device == torch.device("cpu")
    b64 = b.to(dtype=torch.float64)
    assert b64.fields["input1"].dtype == torch.float64 and b64.fields["input0"].dtype == torch.long
    sub = b.index([2, 0])
    assert sub.subject_ids == ["s3", "s1"]
    torch.testing.assert_close(sub.fields["input1"][0], b.fields["input1"][2])
    assert "3 subjects" in repr(b)


def test_text_choices_are_coded_in_label_order():
    rng = np.random.default_rng(2)
    subs = [_subject(rng, (2, 8), text=True) for _ in range(3)]
    with pytest.raises(ValueError, match=r"field 'choices' must hold numbers but has the text '[AB]'"):
        SubjectBatch.from_lists([[c, r] for c, r in subs], names=NAMES)  # only declared fields hold labels
    b = SubjectBatch.from_lists([[c, r] for c, r in subs], names=NAMES, categorical=["choices"])
    assert b.categories == {"choices": ["A", "B"]}
    assert b.fields["choices"].dtype == torch.long
    expected = np.stack([(c == "B").astype(np.int64) for c, _ in subs])
    np.testing.assert_array_equal(b.fields["choices"].numpy(), expected)
    # a list of Python strings works the same way
    b2 = SubjectBatch.from_lists([[c.tolist(), r] for c, r in subs], names=NAMES, categorical=[0])
    torch.testing.assert_close(b2.fields["choices"], b.fields["choices"])
    assert b2.categories == {"choices": ["A", "B"]}


def test_ragged_subjects_are_padded_with_a_correct_mask():
    rng = np.random.default_rng(3)
    shapes = [(2, 24), (4, 24), (3, 20), (1, 5)]
    subs = [_subject(rng, s) for s in shapes]
    b = SubjectBatch.from_lists([[c, r] for c, r in subs], names=NAMES)
    assert b.trial_shape == (4, 24)
    assert b.fields["choices"].shape == (4, 4, 24) and b.fields["rewards"].shape == (4, 4, 24)
    assert b.n_obs.tolist() == [48, 96, 60, 5]
    for i, (c, r) in enumerate(subs):
        nb, nt = c.shape
        expected_mask = np.zeros((4, 24), dtype=bool)
        expected_mask[:nb, :nt] = True
        np.testing.assert_array_equal(b.mask[i].numpy(), expected_mask)
        np.testing.assert_array_equal(b.fields["choices"][i, :nb, :nt].numpy(), c)
        np.testing.assert_array_equal(b.fields["rewards"][i, :nb, :nt].numpy(), r)
        # padding is zero, never garbage
        assert float(b.fields["rewards"][i][~b.mask[i]].abs().sum()) == 0.0
        assert int(b.fields["choices"][i][~b.mask[i]].abs().sum()) == 0


def test_ragged_one_dimensional_subjects():
    rng = np.random.default_rng(4)
    subs = [_subject(rng, (n,)) for n in (10, 7, 13)]
    b = SubjectBatch.from_lists([[c, r] for c, r in subs], names=NAMES)
    assert b.trial_shape == (13,)
    assert b.mask.sum(1).tolist() == [10, 7, 13]
    assert b.mask[1, :7].all() and not b.mask[1, 7:].any()


def test_feature_dimensions_are_kept():
    rng = np.random.default_rng(5)
    subs = [[rng.integers(0, 2, n), rng.random((n, 3))] for n in (6, 9)]
    b = SubjectBatch.from_lists(subs, names=["c", "x"])
    assert b.trial_shape == (9,)
    assert b.fields["x"].shape == (2, 9, 3)
    assert b.mask.shape == (2, 9) and b.mask.sum(1).tolist() == [6, 9]
    np.testing.assert_array_equal(b.fields["x"][0, :6].numpy(), subs[0][1])


# --------------------------------------------------------------- from_dataframe
def _toy_df(rng, n_subjects=3, blocks=(2, 3, 1), ntrials=5, text=True):
    data = []
    for nb in blocks[:n_subjects]:
        c, r = _subject(rng, (nb, ntrials), text=text)
        data.append([c, r])
    return lists_to_dataframe(data, subject_ids=[f"sub{i}" for i in range(n_subjects)]), data


def test_from_dataframe_with_block_and_trial_matches_lists():
    rng = np.random.default_rng(6)
    df, data = _toy_df(rng)
    b = SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial",
                                    categorical=["choice"])
    ref = SubjectBatch.from_lists(data, names=["choice", "reward"], subject_ids=["sub0", "sub1", "sub2"],
                                  categorical=["choice"])
    assert b.names == ["choice", "reward"]
    assert b.subject_ids == ["sub0", "sub1", "sub2"]
    assert b.categories == {"choice": ["A", "B"]}
    assert b.trial_shape == (3, 5)
    torch.testing.assert_close(b.mask, ref.mask)
    torch.testing.assert_close(b.fields["choice"], ref.fields["choice"])
    torch.testing.assert_close(b.fields["reward"], ref.fields["reward"])


def test_from_dataframe_sorts_shuffled_rows_by_block_and_trial():
    rng = np.random.default_rng(7)
    df, _ = _toy_df(rng, text=False)
    ordered = SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial")
    shuffled_df = df.sample(frac=1.0, random_state=3)
    assert not shuffled_df.index.equals(df.index)
    shuffled = SubjectBatch.from_dataframe(shuffled_df, columns=["choice", "reward"], block="block", trial="trial")
    for name in ("choice", "reward"):
        torch.testing.assert_close(shuffled.fields[name], ordered.fields[name])
    torch.testing.assert_close(shuffled.mask, ordered.mask)
    assert shuffled.subject_ids == ordered.subject_ids


def test_from_dataframe_without_block_is_subject_by_trial():
    df = pd.DataFrame({"subject": [2, 2, 2, 1, 1],
                       "choice": [1, 0, 1, 0, 0],
                       "reward": [0.5, 1.0, 0.0, 0.25, 0.75]})
    b = SubjectBatch.from_dataframe(df, columns=["choice", "reward"])
    assert b.subject_ids == [1, 2]  # sorted subjects
    assert b.trial_shape == (3,)
    assert b.mask.tolist() == [[True, True, False], [True, True, True]]
    # row order within a subject is kept when there is no trial column
    assert b.fields["reward"].tolist() == [[0.25, 0.75, 0.0], [0.5, 1.0, 0.0]]
    assert b.fields["choice"].tolist() == [[0, 0, 0], [1, 0, 1]]


def test_from_dataframe_trial_column_without_block_sorts_trials():
    df = pd.DataFrame({"subject": [1, 1, 1, 2, 2],
                       "trial": [3, 1, 2, 2, 1],
                       "choice": [1, 0, 1, 0, 1],
                       "reward": [3.0, 1.0, 2.0, 20.0, 10.0]})
    b = SubjectBatch.from_dataframe(df, columns=["choice", "reward"], trial="trial")
    assert b.fields["reward"].tolist() == [[1.0, 2.0, 3.0], [10.0, 20.0, 0.0]]
    assert b.fields["choice"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert b.mask.tolist() == [[True, True, True], [True, True, False]]


def test_from_dataframe_block_without_trial_keeps_row_order():
    df = pd.DataFrame({"subject": [1, 1, 1, 1, 2, 2],
                       "block": [1, 1, 2, 2, 1, 1],
                       "choice": [0, 1, 1, 1, 0, 0],
                       "reward": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    b = SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block")
    assert b.trial_shape == (2, 2)
    assert b.fields["reward"].tolist() == [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [0.0, 0.0]]]
    assert b.mask.tolist() == [[[True, True], [True, True]], [[True, True], [False, False]]]


def test_from_dataframe_ragged_blocks_within_a_subject():
    df = pd.DataFrame({"subject": [1] * 5,
                       "block": [1, 1, 1, 2, 2],
                       "trial": [1, 2, 3, 1, 2],
                       "choice": ["B", "A", "B", "B", "B"],
                       "reward": [1.0, 0.0, 1.0, 0.0, 1.0]})
    b = SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial",
                                    categorical=["choice"])
    assert b.trial_shape == (2, 3)
    assert b.mask.tolist() == [[[True, True, True], [True, True, False]]]
    assert b.fields["choice"][0][b.mask[0]].tolist() == [1, 0, 1, 1, 1]


def test_from_dataframe_columns_given_as_string():
    df = pd.DataFrame({"subject": [1, 1], "choice": [0, 1], "reward": [1.0, 0.0]})
    b = SubjectBatch.from_dataframe(df, columns="choice, reward")
    assert b.names == ["choice", "reward"]


# ---------------------------------------------------------------------- errors
def _two_subject_lists(fix):
    rng = np.random.default_rng(11)
    subs = [list(_subject(rng, (96,))) for _ in range(3)]
    fix(subs)
    return subs


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_lists_non_finite_values_name_subject_and_field(bad):
    def fix(subs):
        subs[1][1] = subs[1][1].copy()
        subs[1][1][17] = bad

    with pytest.raises(ValueError, match=r"subject 1: field 'rewards' has a (missing|non-finite) value.*index \(17,\)"):
        SubjectBatch.from_lists(_two_subject_lists(fix), names=NAMES)


def test_lists_nan_in_a_tensor_names_subject_and_field():
    subs = _two_subject_lists(lambda s: None)
    subs[2][1] = torch.from_numpy(subs[2][1]).clone()
    subs[2][1][0] = float("nan")
    with pytest.raises(ValueError, match=r"subject 2: field 'rewards'.*missing value"):
        SubjectBatch.from_lists(subs, names=NAMES)


def test_lists_nan_in_choices_names_field():
    subs = _two_subject_lists(lambda s: None)
    subs[0][0] = subs[0][0].astype(float)
    subs[0][0][5] = np.nan
    with pytest.raises(ValueError, match=r"subject 0: field 'choices'.*missing value"):
        SubjectBatch.from_lists(subs, names=NAMES)


def test_empty_subject():
    def fix(subs):
        subs[2] = [np.array([], dtype=np.int64), np.array([])]

    with pytest.raises(ValueError, match=r"subject 2: no trials"):
        SubjectBatch.from_lists(_two_subject_lists(fix), names=NAMES)


def test_empty_data():
    with pytest.raises(ValueError, match="empty"):
        SubjectBatch.from_lists([], names=NAMES)


def test_inconsistent_lengths_within_a_subject():
    def fix(subs):
        subs[1][1] = subs[1][1][:95]

    with pytest.raises(ValueError, match=r"subject 1: field 'rewards' has trial shape \(95,\).*\(96,\)"):
        SubjectBatch.from_lists(_two_subject_lists(fix), names=NAMES)


def test_subject_with_a_different_number_of_fields():
    def fix(subs):
        subs[2].append(np.zeros(96))

    with pytest.raises(ValueError, match=r"subject 2: 3 data fields, expected 2 \(choices, rewards\)"):
        SubjectBatch.from_lists(_two_subject_lists(fix), names=NAMES)


def test_subject_with_different_dimensionality():
    def fix(subs):
        subs[1][0] = subs[1][0].reshape(4, 24)
        subs[1][1] = subs[1][1].reshape(4, 24)

    with pytest.raises(ValueError, match=r"subject 1: field 'choices' has 2 dims"):
        SubjectBatch.from_lists(_two_subject_lists(fix), names=NAMES)


def test_names_count_must_match_fields():
    with pytest.raises(ValueError, match=r"subject 0: 2 data fields but 3 names"):
        SubjectBatch.from_lists(_two_subject_lists(lambda s: None), names=["a", "b", "c"])


def test_subject_ids_count_must_match():
    with pytest.raises(ValueError, match=r"2 subject ids for 3 subjects"):
        SubjectBatch.from_lists(_two_subject_lists(lambda s: None), names=NAMES, subject_ids=[1, 2])


def test_from_lists_rejects_a_dataframe():
    with pytest.raises(ValueError, match="from_dataframe"):
        SubjectBatch.from_lists(pd.DataFrame({"a": [1]}))


def test_missing_text_label_in_lists():
    def fix(subs):
        subs[0][0] = np.where(subs[0][0] == 1, "B", "A")
        subs[1][0] = np.where(subs[1][0] == 1, "B", "A").astype(object)
        subs[1][0][40] = None
        subs[2][0] = np.where(subs[2][0] == 1, "B", "A")

    with pytest.raises(ValueError, match=r"subject 1: field 'choices' has a missing value.*\(40,\)"):
        SubjectBatch.from_lists(_two_subject_lists(fix), names=NAMES, categorical=["choices"])


def test_nan_text_label_in_python_list_is_an_error():
    subs = [[["A", "B", "A"], [1.0, 0.0, 1.0]], [["B", float("nan"), "A"], [0.0, 1.0, 1.0]]]
    with pytest.raises(ValueError, match=r"subject 1: field 'choices'.*missing"):
        SubjectBatch.from_lists(subs, names=NAMES, categorical=["choices"])


def _df_for_errors():
    rng = np.random.default_rng(12)
    df, _ = _toy_df(rng, blocks=(2, 2, 2), text=True)
    return df


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_dataframe_non_finite_values_name_subject_and_column(bad):
    df = _df_for_errors()
    row = df.index[(df.subject == "sub1") & (df.block == 2) & (df.trial == 4)][0]
    df.loc[row, "reward"] = bad
    with pytest.raises(ValueError, match=rf"subject 'sub1': field 'reward' has a (missing|non-finite) value.* "
                                         rf"at data row {row + 1} \(line {row + 2} of a CSV file"):
        SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial",
                                    categorical=["choice"])
    with pytest.raises(ValueError, match=r"subject 'sub1': field 'reward'.*value"):
        SubjectBatch.from_dataframe(df, columns=["choice", "reward"], trial=False, categorical=["choice"])


def test_dataframe_nan_in_numeric_choices():
    df = _df_for_errors()
    df["choice"] = (df["choice"] == "B").astype(float)
    df.loc[df.index[(df.subject == "sub2")][3], "choice"] = np.nan
    with pytest.raises(ValueError, match=r"subject 'sub2': field 'choice'.*missing value"):
        SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial")


def test_dataframe_nan_in_unused_column_is_fine():
    df = _df_for_errors()
    df["notes"] = np.nan
    b = SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial",
                                    categorical=["choice"])
    assert b.n_subjects == 3


@pytest.mark.parametrize("missing", [None, np.nan])
def test_dataframe_missing_text_value(missing):
    df = _df_for_errors()
    df["choice"] = df["choice"].astype(object)
    row = df.index[(df.subject == "sub0") & (df.block == 1) & (df.trial == 3)][0]
    df.loc[row, "choice"] = missing
    with pytest.raises(ValueError, match=rf"subject 'sub0': field 'choice' has a missing value.*data row {row + 1} "):
        SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial",
                                    categorical=["choice"])


def test_dataframe_unknown_columns():
    df = _df_for_errors()
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['rewrd'\]"):
        SubjectBatch.from_dataframe(df, columns=["choice", "rewrd"])
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['blk'\]"):
        SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="blk")
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['participant'\]"):
        SubjectBatch.from_dataframe(df, subject="participant", columns=["choice", "reward"])
    with pytest.raises(ValueError, match="columns must name"):
        SubjectBatch.from_dataframe(df, columns=None)


def test_dataframe_duplicated_block_trial_rows():
    df = _df_for_errors()
    dup = df[(df.subject == "sub2") & (df.block == 1) & (df.trial == 2)]
    df = pd.concat([df, dup], ignore_index=True)
    with pytest.raises(ValueError, match=r"subject 'sub2': duplicated rows for \{'block': 1, 'trial': 2\}"):
        SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial")


def test_dataframe_missing_block_or_subject_value():
    df = _df_for_errors()
    df["block"] = df["block"].astype(float)
    df.loc[5, "block"] = np.nan
    with pytest.raises(ValueError, match=r"column 'block' is missing at data row 6 \(line 7 of a CSV file"):
        SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial")


def test_dataframe_empty_and_wrong_type():
    df = _df_for_errors()
    with pytest.raises(ValueError, match="no rows"):
        SubjectBatch.from_dataframe(df.iloc[:0], columns=["choice", "reward"])
    with pytest.raises(ValueError, match="expected a pandas DataFrame"):
        SubjectBatch.from_dataframe([[1, 2]], columns=["choice"])


# -------------------------------------------------- model-level data checks
def test_choice_out_of_range_is_rejected_by_the_model():
    data = ragged_bandit_data(seed=1, blocks=(2, 3, 2))
    data[1][0] = data[1][0].copy()
    data[1][0][2, 7] = 2
    with pytest.raises(ValueError, match=r"subject 1: field 'choices' has value 2 at index \(2, 7\)"):
        EMModel(data, rw1a1b_fit, device="cpu")
    data[1][0][2, 7] = -1
    with pytest.raises(ValueError, match=r"subject 1: field 'choices' has value -1"):
        EMModel(data, rw1a1b_fit, device="cpu")


def test_choice_out_of_range_from_dataframe():
    df = lists_to_dataframe(ragged_bandit_data(seed=2, blocks=(2, 2)), subject_ids=["a", "b"])
    df.loc[df.index[(df.subject == "b")][10], "choice"] = 3
    with pytest.raises(ValueError, match=r"subject 'b': field 'choice' has value 3"):
        EMModel(df, rw1a1b_fit, columns=["choice", "reward"], block="block", trial="trial", device="cpu")


def test_fractional_choice_codes_are_rejected():
    data = ragged_bandit_data(seed=1, blocks=(1, 1))
    data[0][0] = data[0][0].astype(float)
    data[0][0][0, 3] = 0.5
    with pytest.raises(ValueError, match=r"subject 0: field 'choices' must hold integer option codes"):
        EMModel(data, rw1a1b_fit, device="cpu")


def test_three_text_labels_exceed_a_two_option_model():
    data = [[np.array(["A", "B", "C"]), np.array([1.0, 0.0, 1.0])],
            [np.array(["A", "A", "B"]), np.array([1.0, 0.0, 1.0])]]
    with pytest.raises(ValueError, match=r"subject 0: field 'choices' has the label 'C' at index \(2,\)"):
        EMModel(data, rw1a1b_fit, device="cpu")


def test_padding_is_not_checked_as_a_choice():
    # padded cells hold 0, a valid code; a ragged batch with valid data must pass the check
    data = ragged_bandit_data(seed=4, blocks=(1, 3))
    model = EMModel(data, rw1a1b_fit, device="cpu")
    assert model.batch.n_obs.tolist() == [24, 72]


def test_pandas_nullable_dtypes():
    base = {"subject": [1, 1, 2, 2, 2], "block": [1, 1, 1, 1, 2], "trial": [1, 2, 1, 2, 1]}
    df = pd.DataFrame({**base, "choice": pd.array([0, 1, 0, 1, 1], dtype="Int64"),
                       "reward": pd.array([1.0, 0.0, 0.5, 0.0, 1.0], dtype="Float64")})
    b = SubjectBatch.from_dataframe(df, columns=["choice", "reward"], block="block", trial="trial")
    assert b.fields["choice"].dtype == torch.long and b.fields["reward"].dtype == torch.float64
    assert b.fields["choice"].tolist() == [[[0, 1], [0, 0]], [[0, 1], [1, 0]]]
    assert b.fields["reward"].tolist() == [[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.0], [1.0, 0.0]]]
    with_na = df.copy()
    with_na.loc[3, "reward"] = pd.NA
    with pytest.raises(ValueError, match=r"subject 2: field 'reward'.*data row 4 "):
        SubjectBatch.from_dataframe(with_na, columns=["choice", "reward"], block="block", trial="trial")
    text = df.copy()
    text["choice"] = pd.array(["A", "B", "A", None, "B"], dtype="string")
    with pytest.raises(ValueError, match=r"subject 2: field 'choice'.*missing.*data row 4 "):
        SubjectBatch.from_dataframe(text, columns=["choice", "reward"], block="block", trial="trial",
                                    categorical=["choice"])
