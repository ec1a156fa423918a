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

pytestmark = pytest.mark.filterwarnings("ignore:EM did not converge:RuntimeWarning")

TOL = 1e-10
FIT = {"verbose": 0, "mstep_maxit": 40}


def _model(n: int = 40, seed: int = 3) -> EMModel:
    _, _, all_data = simulate_bandit(n, seed=seed)
    return EMModel(all_data, rw1a1b_fit, device="cpu")


def _fit_numbers(model: EMModel, **kwargs) -> dict:
    """Everything a fit is compared by: MAPs, inverse Hessians, group, NPL, LME, iBIC, history."""
    res = model.fit(**FIT, **kwargs)
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


def _worker_fit_and_studies() -> dict:
    """Runs on every rank: a sharded fit (with evidence), a covariate fit, and identify and recover over ranks."""
    ctx = distributed.context("cpu")
    assert ctx is not None and ctx.world_size == 2
    model = _model()
    cov = pd.DataFrame({"g": np.arange(40) % 2}, index=model.batch.subject_ids)
    out = {"plain": _fit_numbers(model), "covariates": _fit_numbers(_model(), group="student_t", covariates=cov),
           "identify": _identify(), "recover": _recover(), "rank": ctx.rank,
           "shard": ctx.shard(40)}
    return out


def _assert_same(one: dict, many: dict) -> None:
    assert one["n_iter"] == many["n_iter"]
    np.testing.assert_array_equal(one["status"], many["status"])
    for key in ("m", "inv_h", "mu", "var", "npl", "lap", "history"):
        np.testing.assert_allclose(many[key], one[key], rtol=0, atol=TOL, err_msg=key)
    assert abs(one["lme"] - many["lme"]) < TOL
    assert abs(one["ibic"] - many["ibic"]) < TOL


def test_two_gloo_ranks_equal_one_process():
    many = distributed.launch(_worker_fit_and_studies, 2)
    assert many["rank"] == 0 and many["shard"] == (0, 20)  # rank 0 returned its view: the gathered result
    model = _model()
    cov = pd.DataFrame({"g": np.arange(40) % 2}, index=model.batch.subject_ids)
    _assert_same(_fit_numbers(model), many["plain"])
    _assert_same(_fit_numbers(_model(), group="student_t", covariates=cov), many["covariates"])
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


def _die(state) -> None:
    if state.iteration == 10:
        raise KeyboardInterrupt("killed")


def _worker_checkpoint(path: str) -> None:
    """Two ranks fit with checkpoints every 4 E-steps (rank 0 writes them) and die in E-step 10."""
    _model().fit(verbose=0, mstep_maxit=30, checkpoint=path, checkpoint_every=4, callback=_die)


def test_checkpoint_of_two_ranks_resumes_in_one_process(tmp_path):
    path = str(tmp_path / "run.pt")
    with pytest.raises(Exception, match="KeyboardInterrupt|callback raised"):
        distributed.launch(_worker_checkpoint, 2, (path,))
    resumed = _model().fit(verbose=0, mstep_maxit=30, resume=path, checkpoint=path, checkpoint_every=4)
    straight = _model().fit(verbose=0, mstep_maxit=30)
    assert resumed.n_iter == straight.n_iter
    np.testing.assert_allclose(resumed.m.numpy(), straight.m.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(resumed.posterior_var.numpy(), straight.posterior_var.numpy(), rtol=0, atol=TOL)


def test_cli_fit_nproc_2_writes_the_one_process_outputs(tmp_path, capsys):
    _, _, all_data = simulate_bandit(30, seed=4)
    df = lists_to_dataframe(all_data)
    data = tmp_path / "d.csv"
    df.to_csv(data, index=False)
    common = ["fit", str(data), "--model", "rw1a1b", "--columns", "choice,reward", "--block", "block", "--trial", "trial",
              "--device", "cpu", "--quiet", "--nsamples", "200", "--maxit", "40"]
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
    return _fit_numbers(_model())


@pytest.mark.slow
def test_four_gloo_ranks_equal_one_process():
    _assert_same(_fit_numbers(_model()), distributed.launch(_worker_four, 4))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_nccl_ranks_on_gpus():
    many = distributed.launch(_worker_cuda, 2)
    one = EMModel(_model().batch, rw1a1b_fit, device="cuda:0").fit(**FIT)
    np.testing.assert_allclose(many, one.m.cpu().numpy(), rtol=0, atol=1e-8)


def _worker_cuda():
    model = EMModel(_model().batch, rw1a1b_fit, device="cuda")
    assert model.device.index == distributed.context("cuda").rank
    return model.fit(**FIT).m.cpu().numpy()
