"""Every model in the library registry works with ``recover`` and ``ModelComparison.identify``."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchem import EMModel, ModelComparison
from torchem.models import MODELS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from recovery_table import DESIGNS, draw_params, template  # noqa: E402

torch.set_num_threads(1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recover_and_identify_run_for_every_library_model(name):
    fit = MODELS[name]
    design = DESIGNS[name][0]
    model = EMModel(template(name), fit, device="cpu")
    true = draw_params(name, 8, np.random.default_rng(0))
    rec = model.recover(true, seed=1, fit_kwargs={"mstep_maxit": 2}, **design)
    assert rec["estimated_params"].shape == true.shape
    assert np.isfinite(rec["estimated_params"]).all()
    assert rec["param_names"] == list(fit.param_names)

    df = ModelComparison([model], [name]).identify(nrounds=1, nsubjects=6, sim_kwargs=design,
                                                   fit_kwargs={"mstep_maxit": 2}, verbose=0,
                                                   bicint_kwargs={"nsamples": 50})
    assert len(df) == 1 and df["bestlme"].iloc[0] == 1
    assert np.isfinite(df[["LME", "BICint", "pseudoR2"]].to_numpy(float)).all()
