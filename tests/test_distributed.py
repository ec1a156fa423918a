"""Fits over a process group (torch.distributed, gloo on the CPU) equal the fit of one process.

Each test starts its processes once (``torchem.distributed.launch``: ``torch.multiprocessing`` spawn, one
thread each) and runs everything it checks inside them, because starting a process and importing torch
costs seconds.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import lists_to_dataframe, simulate_bandit
from torchem import EMModel, ModelComparison, distributed
from torchem.cli import main
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate, rw2a1b_fit, rw2a1b_simulate

pytestmark = [pytest.mark.filterwarnings("ignore:EM did not converge:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:.*did not converge in the final E-step:RuntimeWarning")]

TOL = 1e-10
FIT = {"verbose": 0, "mstep_maxit": 40}
RESTARTS = {"mstep_maxit": 3, "estep_maxit": 2, "max_restarts": 2}  # few L-BFGS steps: many subjects restart


def _model(n: int = 40, seed: int = 3) -> EMModel:
    _, _, all_data = simulate_bandit(n, seed=seed)
    return EMModel(all_data, rw1a1b_fit, device="cpu")


def _fit_numbers(model: EMModel, **kwargs) -> dict:
    """Everything a fit is compared by: MAPs, inverse Hessians, group, NPL, LME, iBIC, history."""
    res = model.fit(**{**FIT, **kwargs})
    lap, lme, _ = model.compute_lme()
    return {"m": res.m.numpy(), "inv_h": res.inv_h.numpy(), "mu": res.posterior_mu.numpy(),
            "var": res.posterior_var.numpy(), "npl": res.NPL.numpy(), "lap": lap, "lme": lme,
            "ibic": model.compute_integrated_bic(nsamples=300), "n_iter": res.n_iter,
            "history": res.history["NPL"].to_numpy(), "status": res.status.numpy()}


def _identify(n_rounds: int = 2) -> pd.DataFrame:
    models = [EMModel(None, rw1a1b_fit, simulate_func=rw1a1b_simulate, device="cpu"),
              EMModel(None, rw2a1b_fit, simulate_func=rw2a1b_simulate, device="cpu")]
    mc = ModelComparison(models, ["rw1a1b", "rw2a1b"])
    return mc.identify(nrounds=n_rounds, nsubjects=20, sim_kwargs={"nblocks": 2, "ntrials": 24},
                       fit_kwargs={"mstep_maxit": 15}, verbose=0, bicint_kwargs={"nsamples": 100})


def _recover() -> dict:
    params, _, _ = simulate_bandit(20, seed=5)
    model = EMModel(None, rw1a1b_fit, simulate_func=rw1a1b_simulate, device="cpu")
    out = model.recover(params, nrounds=3, fit_kwargs={"mstep_maxit": 15}, nblocks=2, ntrials=24, seed=11)
    return {k: out[k] for k in ("estimated_params", "correlation_rounds", "rmse_rounds")}


def _importance() -> dict:
    model = _model(25, seed=6)  # shards of 12 and 13 subjects: the gather pads the smaller one
    res = model.fit(verbose=0, estep="importance", nsamples=150, mstep_maxit=30)
    return {"m": res.m.numpy(), "var": res.posterior_var.numpy(), "n_iter": res.n_iter,
            "lme": model.compute_lme("importance", nsamples=200)[0]}


def _worker_fit_and_studies(path: str) -> dict:
    """Runs on every rank: sharded fits (with evidence and checkpoints), identify and recover over ranks."""
    ctx = distributed.context("cpu")
    assert ctx is not None and ctx.world_size == 2
    model = _model()
    cov = pd.DataFrame({"g": np.arange(40) % 2}, index=model.batch.subject_ids)
    return {"plain": _fit_numbers(model, checkpoint=path, checkpoint_every=4),
            "covariates": _fit_numbers(_model(), group="student_t", covariates=cov),
            "restarts": _fit_numbers(_model(), **RESTARTS),
            "importance": _importance(), "identify": _identify(), "recover": _recover(), "rank": ctx.rank,
            "shard": ctx.shard(40)}


def _assert_same(one: dict, many: dict) -> None:
    assert one["n_iter"] == many["n_iter"]
    np.testing.assert_array_equal(one["status"], many["status"])
    for key in ("m", "inv_h", "mu", "var", "npl", "lap", "history"):
        np.testing.assert_allclose(many[key], one[key], rtol=0, atol=TOL, err_msg=key)
    assert abs(one["lme"] - many["lme"]) < TOL
    assert abs(one["ibic"] - many["ibic"]) < TOL


def test_two_gloo_ranks_equal_one_process(tmp_path):
    path = str(tmp_path / "run.pt")
    many = distributed.launch(_worker_fit_and_studies, 2, (path,))
    assert many["rank"] == 0 and many["shard"] == (0, 20)  # rank 0 returned its view: the gathered result
    model = _model()
    cov = pd.DataFrame({"g": np.arange(40) % 2}, index=model.batch.subject_ids)
    one = _fit_numbers(model)
    _assert_same(one, many["plain"])
    # the checkpoint rank 0 wrote holds every subject: one process resumes it and ends where the fit ended
    assert torch.load(path, weights_only=True)["estep"]["has_lik"].all()
    resumed = _model().fit(**FIT, resume=path)
    assert resumed.n_iter == one["n_iter"]
    np.testing.assert_allclose(resumed.m.numpy(), one["m"], rtol=0, atol=TOL)
    _assert_same(_fit_numbers(_model(), group="student_t", covariates=cov), many["covariates"])
    # restarts draw from each subject's own generator, whichever rank runs the subject
    restarts = _fit_numbers(_model(), **RESTARTS)
    assert (restarts["status"] != 0).sum() >= 10  # failed MAP searches, each restarted max_restarts times
    _assert_same(restarts, many["restarts"])
    # importance E-steps and importance LME: each subject's draws are its own, so ranks do not change them
    imp = _importance()
    assert imp["n_iter"] == many["importance"]["n_iter"]
    for key in ("m", "var", "lme"):
        np.testing.assert_allclose(many["importance"][key], imp[key], rtol=0, atol=TOL, err_msg=key)
    # identify: every (round, simulated, estimated) score as in one process, in the same order
    pd.testing.assert_frame_equal(many["identify"], _identify(), check_exact=False, rtol=0, atol=1e-8)
    rec = _recover()
    for key, value in rec.items():
        np.testing.assert_allclose(many["recover"][key], value, rtol=0, atol=1e-8, err_msg=key)


def test_shards_are_contiguous_and_cover_everything():
    for n, w in ((10, 3), (7, 4), (3, 4), (100_001, 2)):
        bounds = [distributed.shard(n, r, w) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_no_process_group_means_one_process(monkeypatch):
    for var in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.context("cpu") is None and distributed.is_writer()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not distributed.is_writer()
    with distributed.local():
        assert distributed.context("cpu") is None and distributed.is_writer()


def test_cli_fit_nproc_2_writes_the_one_process_outputs(tmp_path, capsys):
    _, _, all_data = simulate_bandit(30, seed=4)
    df = lists_to_dataframe(all_data)
    data = tmp_path / "d.csv"
    df.to_csv(data, index=False)
    common = ["fit", str(data), "--model", "rw1a1b", "--columns", "choice,reward", "--block", "block",
              "--trial", "trial", "--device", "cpu", "--quiet", "--nsamples", "200", "--maxit", "40"]
    assert main(common + ["--out", str(tmp_path / "one.csv"), "--summary", str(tmp_path / "one.json")]) == 0
    assert main(common + ["--nproc", "2", "--out", str(tmp_path / "two.csv"),
                          "--summary", str(tmp_path / "two.json")]) == 0
    one, two = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    num = one.select_dtypes("number").columns
    np.testing.assert_allclose(two[num].to_numpy(), one[num].to_numpy(), rtol=0, atol=TOL)
    s1, s2 = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert abs(s1["BICint"] - s2["BICint"]) < TOL and abs(s1["LME"] - s2["LME"]) < TOL
    assert s1["em_iterations"] == s2["em_iterations"]


def _worker_four() -> dict:
    return _fit_numbers(_model(42))


@pytest.mark.slow
def test_four_gloo_ranks_equal_one_process():  # shards of 10 and 11 subjects
    _assert_same(_fit_numbers(_model(42)), distributed.launch(_worker_four, 4))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_nccl_ranks_on_gpus():
    many = distributed.launch(_worker_cuda, 2)
    one = EMModel(_model().batch, rw1a1b_fit, device="cuda:0").fit(**FIT)
    # GPU kernels reduce in an order that depends on the batch size, so shards agree to rounding, not bit for bit
    np.testing.assert_allclose(many, one.m.cpu().numpy(), rtol=0, atol=1e-6)


def _worker_cuda():
    model = EMModel(_model().batch, rw1a1b_fit, device="cuda")
    assert model.device.index == distributed.context("cuda").rank
    return model.fit(**FIT).m.cpu().numpy()
