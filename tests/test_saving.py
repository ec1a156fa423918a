"""Saving and loading results, chunked E-steps (same numbers as one batch)."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from torchem import EMModel, FitResult
from torchem.models.rl import rw1a1b_fit

from conftest import simulate_bandit

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def bandit():
    _, _, all_data = simulate_bandit(24, nblocks=2, ntrials=24, seed=5)
    return all_data


@pytest.fixture(scope="module")
def fitted(bandit):
    model = EMModel(bandit, rw1a1b_fit, device="cpu")
    model.fit(verbose=0, mstep_maxit=40)
    return model


def _same(a: FitResult, b: FitResult) -> None:
    pd.testing.assert_frame_equal(a.params_df(), b.params_df(), check_exact=True)
    for k in ("m", "inv_h", "NPL", "NLPrior", "NLL", "hess_logdet", "hessian_ok", "laplace_capped", "status", "n_obs"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.group.state_dict()["family"] == b.group.state_dict()["family"]
    for k, v in a.group.raw_hyper().items():
        assert torch.equal(v, b.group.raw_hyper()[k]), k
    assert (a.lme is None) == (b.lme is None) and (a.lme is None or torch.equal(a.lme, b.lme))
    assert a.summary() == b.summary()
    pd.testing.assert_frame_equal(a.history, b.history, check_dtype=False)


class TestSaveLoad:
    def test_round_trip(self, fitted, tmp_path):
        res = fitted.result
        res.save(tmp_path / "fit.pt")
        back = FitResult.load(tmp_path / "fit.pt")
        _same(res, back)
        assert back.options.group == res.options.group and back.options.seed == res.options.seed
        assert back.estep_prior is not None and torch.equal(back.estep_prior.mean, res.estep_prior.mean)

    def test_model_round_trip_gives_the_same_evidence(self, fitted, bandit, tmp_path):
        fitted.save(tmp_path / "model.pt")
        other = EMModel(bandit, rw1a1b_fit, device="cpu").load(tmp_path / "model.pt")
        _same(fitted.result, other.result)
        lme_a, lme_b = fitted.compute_lme()[1], other.compute_lme()[1]
        assert lme_a == lme_b and np.isfinite(lme_a)
        bic_a = fitted.compute_integrated_bic(nsamples=200, seed=3)
        assert other.compute_integrated_bic(nsamples=200, seed=3) == bic_a

    @pytest.mark.parametrize("group", ["laplace", "student_t", "full"])
    def test_group_families(self, bandit, group, tmp_path):
        model = EMModel(bandit, rw1a1b_fit, device="cpu")
        res = model.fit(verbose=0, group=group, mstep_maxit=4)
        res.save(tmp_path / "g.pt")
        back = FitResult.load(tmp_path / "g.pt")
        _same(res, back)
        assert type(back.group) is type(res.group) and back.group.config() == res.group.config()

    def test_float32_and_wrong_model(self, bandit, tmp_path):
        model = EMModel(bandit, rw1a1b_fit, device="cpu", dtype=torch.float32)
        res = model.fit(verbose=0, mstep_maxit=3)
        res.save(tmp_path / "f32.pt")
        back = FitResult.load(tmp_path / "f32.pt")
        assert back.m.dtype == torch.float32
        _same(res, back)
        other = EMModel(bandit[:10], rw1a1b_fit, device="cpu")
        with pytest.raises(ValueError, match="subject ids differ"):
            other.load(tmp_path / "f32.pt")

    def test_custom_transform_must_be_given_again(self, bandit, tmp_path):
        def fit2(params, choices, rewards, mask=None, output="nll"):
            return rw1a1b_fit(params, choices, rewards, mask=mask, output=output)

        xform = [lambda x: 2 * x, lambda x: x]
        model = EMModel(bandit, fit2, ["beta", "lr"], xform, device="cpu")
        model.fit(verbose=0, mstep_maxit=3)
        model.save(tmp_path / "c.pt")
        back = FitResult.load(tmp_path / "c.pt")
        with pytest.raises(ValueError, match="custom function"):
            back.params_df()
        again = EMModel(bandit, fit2, ["beta", "lr"], xform, device="cpu").load(tmp_path / "c.pt")
        pd.testing.assert_frame_equal(again.result.params_df(), model.result.params_df())

    def test_foreign_and_tampered_files(self, fitted, tmp_path):
        class Evil:
            def __reduce__(self):
                return (print, ("code ran",))

        path = tmp_path / "evil.pt"
        with open(path, "wb") as fh:
            pickle.dump({"format": "torchem.FitResult", "x": Evil()}, fh)
        with pytest.raises(ValueError, match="not a torchem result file"):
            FitResult.load(path)
        torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
        with pytest.raises(ValueError, match="format marker"):
            FitResult.load(tmp_path / "foreign.pt")
        (tmp_path / "text.pt").write_text("hello")
        with pytest.raises(ValueError, match="not a torchem result file"):
            FitResult.load(tmp_path / "text.pt")
        fitted.save(tmp_path / "ok.pt")
        payload = torch.load(tmp_path / "ok.pt", weights_only=True)
        payload["tensors"]["NPL"] = payload["tensors"]["NPL"][:3]
        torch.save(payload, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match="damaged.*NPL"):
            FitResult.load(tmp_path / "bad.pt")


class TestChunks:
    def test_one_three_seven_chunks_are_bit_identical(self, bandit):
        model = EMModel(bandit[:21], rw1a1b_fit, device="cpu")
        results = [model.fit(verbose=0, mstep_maxit=15, chunk_size=size) for size in (None, 21, 7, 3)]
        ref = results[0]
        for res in results[1:]:
            _same(ref, res)

    def test_chunks_with_restarts_are_bit_identical(self, bandit, monkeypatch):
        import torchem.estep

        drawn = []
        real = torchem.estep.restart_draws

        def spy(prior, subjects, *args):
            drawn.append(subjects.numel())
            return real(prior, subjects, *args)

        monkeypatch.setattr(torchem.estep, "restart_draws", spy)
        model = EMModel(bandit[:21], rw1a1b_fit, device="cpu")
        results = [model.fit(verbose=0, mstep_maxit=3, estep_maxit=3, max_restarts=2, chunk_size=size)
                   for size in (None, 7, 3)]
        # few L-BFGS iterations: many subjects fail and restart from draws of the group
        assert sum(drawn) >= 3 * 10
        for res in results[1:]:
            _same(results[0], res)

    @pytest.mark.parametrize("group", ["laplace", "student_t"])
    def test_heavy_tailed_groups_chunk_resume_and_save_bit_identically(self, bandit, group, tmp_path):
        """Their E-steps carry each subject's posterior variances from one E-step to the next."""
        model = EMModel(bandit[:21], rw1a1b_fit, device="cpu")
        ref = model.fit(verbose=0, mstep_maxit=12, group=group, checkpoint=str(tmp_path / "c.pt"),
                        checkpoint_every=5)
        assert ref.lme is not None and ref.n_iter == 12
        _same(ref, model.fit(verbose=0, mstep_maxit=12, group=group, chunk_size=4))
        _same(ref, model.fit(verbose=0, mstep_maxit=12, group=group, resume=str(tmp_path / "c.pt")))
        model.save(tmp_path / "r.pt")
        loaded = FitResult.load(tmp_path / "r.pt")
        _same(ref, loaded)
        np.testing.assert_allclose(model.compute_lme()[0], ref.lme.numpy(), rtol=0, atol=0)

    def test_float32_chunks_agree_to_its_rounding(self, bandit):
        model = EMModel(bandit[:21], rw1a1b_fit, device="cpu", dtype=torch.float32)
        ref, res = (model.fit(verbose=0, mstep_maxit=15, chunk_size=size) for size in (None, 3))
        torch.testing.assert_close(ref.m, res.m, rtol=0, atol=2e-3)
        torch.testing.assert_close(ref.NPL.sum(), res.NPL.sum(), rtol=1e-4, atol=0)  # float32 E-step tolerance

    def test_importance_chunks(self, bandit):
        model = EMModel(bandit[:12], rw1a1b_fit, device="cpu")
        a = model.fit(verbose=0, mstep_maxit=12, estep="importance", nsamples=200, chunk_size=None)
        b = model.fit(verbose=0, mstep_maxit=12, estep="importance", nsamples=200, chunk_size=5)
        # the Laplace phase is identical; the importance draws differ by chunk (Monte Carlo agreement)
        lap = a.history["estep"] == "laplace"
        pd.testing.assert_frame_equal(a.history[lap], b.history[lap])
        torch.testing.assert_close(a.m, b.m, rtol=0, atol=1e-12)
        np.testing.assert_allclose(a.history["LME"].iloc[-1], b.history["LME"].iloc[-1], atol=0.5)

    def test_auto_and_bad_values(self, bandit):
        from torchem.estep import auto_chunk_size, free_memory

        model = EMModel(bandit[:6], rw1a1b_fit, device="cpu")
        assert free_memory(torch.device("cpu")) > 10**7
        assert auto_chunk_size(model.batch, 2, torch.float64) == 6  # a small study fits at once
        assert auto_chunk_size(model.batch, 2, torch.float64, fraction=1e-9) == 1
        res = model.fit(verbose=0, mstep_maxit=3, chunk_size="auto")
        assert res.options.chunk_size == "auto"
        for bad in (0, -2, 2.5, "big", True):
            with pytest.raises(ValueError, match="chunk_size"):
                model.fit(verbose=0, chunk_size=bad)


_FIT_SCRIPT = """
import pickle, sys, torch
torch.set_num_threads(1)
from torchem import EMModel
from torchem.models.rl import rw1a1b_fit
data = pickle.load(open(sys.argv[1], "rb"))
def report(state):
    print(state.iteration, flush=True)
EMModel(data, rw1a1b_fit, device="cpu").fit(verbose=0, callback=report, checkpoint=sys.argv[2], checkpoint_every=3,
                                             mstep_maxit=30, seed=4)
"""


class TestCheckpoint:
    def test_killed_fit_resumes_to_the_same_end(self, bandit, tmp_path):
        import signal
        import subprocess
        import sys

        (tmp_path / "data.pkl").write_bytes(pickle.dumps(bandit))
        (tmp_path / "fit.py").write_text(_FIT_SCRIPT)
        ckpt = tmp_path / "run.pt"
        proc = subprocess.Popen([sys.executable, str(tmp_path / "fit.py"), str(tmp_path / "data.pkl"), str(ckpt)],
                                stdout=subprocess.PIPE, text=True, env={**__import__("os").environ,
                                                                        "OMP_NUM_THREADS": "1"})
        for line in proc.stdout:
            if int(line) >= 8 and ckpt.exists():
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL
        saved = torch.load(ckpt, weights_only=True)
        done = len(__import__("json").loads(saved["meta"])["rows"])
        model = EMModel(bandit, rw1a1b_fit, device="cpu")
        whole = model.fit(verbose=0, mstep_maxit=30, seed=4)
        assert 3 <= done < whole.n_iter
        resumed = model.fit(verbose=0, mstep_maxit=30, seed=4, resume=str(ckpt))
        _same(whole, resumed)
        assert resumed.convergence == whole.convergence and resumed.stop_reason == whole.stop_reason
        # in-process, with checkpoints every step: the same end again
        again = model.fit(verbose=0, mstep_maxit=30, seed=4, checkpoint=str(tmp_path / "b.pt"), checkpoint_every=1)
        _same(whole, again)

    def test_other_data_or_options_refused(self, bandit, tmp_path):
        model = EMModel(bandit, rw1a1b_fit, device="cpu")
        first = model.fit(verbose=0, mstep_maxit=6, checkpoint=str(tmp_path / "c.pt"), checkpoint_every=2)
        model.save(tmp_path / "result.pt")
        # where and how it is computed may change: another chunk size ends at the same point
        _same(first, model.fit(verbose=0, mstep_maxit=6, chunk_size=5, resume=str(tmp_path / "c.pt")))
        with pytest.raises(ValueError, match=r"options differ \(seed\)"):
            model.fit(verbose=0, mstep_maxit=6, seed=1, resume=str(tmp_path / "c.pt"))
        other = EMModel(bandit[:-1], rw1a1b_fit, device="cpu")
        with pytest.raises(ValueError, match="other data"):
            other.fit(verbose=0, mstep_maxit=6, resume=str(tmp_path / "c.pt"))
        with pytest.raises(ValueError, match="not a torchem checkpoint"):
            model.fit(verbose=0, mstep_maxit=6, resume=str(tmp_path / "result.pt"))
        assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporary files


class TestThreads:
    def test_small_fit_runs_on_one_thread_unless_set(self, bandit, monkeypatch):
        import torchem.em

        model = EMModel(bandit[:8], rw1a1b_fit, device="cpu")
        seen = []
        before = torch.get_num_threads()
        model.fit(verbose=0, mstep_maxit=2, num_threads=2, callback=lambda s: seen.append(torch.get_num_threads()))
        assert seen == [2, 2] and torch.get_num_threads() == before
        # not set by the user: one thread for a small batch; set: kept
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        try:
            torch.set_num_threads(2)
            monkeypatch.setattr(torchem.em, "_TORCH_THREADS", 2)
            seen.clear()
            model.fit(verbose=0, mstep_maxit=2, callback=lambda s: seen.append(torch.get_num_threads()))
            assert seen == [1, 1] and torch.get_num_threads() == 2
            monkeypatch.setattr(torchem.em, "SMALL_BATCH_CELLS", 10)
            seen.clear()
            model.fit(verbose=0, mstep_maxit=2, callback=lambda s: seen.append(torch.get_num_threads()))
            assert seen == [2, 2]
            monkeypatch.setattr(torchem.em, "SMALL_BATCH_CELLS", 10**6)
            monkeypatch.setattr(torchem.em, "_TORCH_THREADS", 3)  # the user changed the count after import
            seen.clear()
            model.fit(verbose=0, mstep_maxit=2, callback=lambda s: seen.append(torch.get_num_threads()))
            assert seen == [2, 2]
        finally:
            torch.set_num_threads(before)
        with pytest.raises(ValueError, match="num_threads"):
            model.fit(verbose=0, num_threads=0)


def test_dataframe_subject_ids_survive(tmp_path):
    """Subject ids read from a table (numpy integers, text) come back equal."""
    _, _, data = simulate_bandit(6, nblocks=1, ntrials=20, seed=2)
    rows = [{"subject": 100 + i, "choices": c, "rewards": r}
            for i, (ch, rw) in enumerate(data) for c, r in zip(np.ravel(ch), np.ravel(rw))]
    df = pd.DataFrame(rows)
    model = EMModel(df, rw1a1b_fit, device="cpu", columns=["choices", "rewards"], trial=False)
    model.fit(verbose=0, mstep_maxit=2)
    model.save(tmp_path / "df.pt")
    again = EMModel(df, rw1a1b_fit, device="cpu", columns=["choices", "rewards"], trial=False).load(tmp_path / "df.pt")
    assert list(again.result.subject_ids) == list(model.result.subject_ids) == list(range(100, 106))
    pd.testing.assert_frame_equal(again.result.params_df(), model.result.params_df())
