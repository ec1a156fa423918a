"""Model comparison and identifiability: ``ModelComparison`` (pyEM's names).

``compare`` scores fitted models by summed Laplace evidence (LME), integrated
BIC and pseudo-R², and runs random-effects Bayesian model selection on the
per-subject evidences.  ``identify`` simulates from every model, fits every
model to every simulated data set and counts which model wins.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import distributed, evidence, plotting
from .api import EMModel
from .crossval import CVResult, compare_cv

__all__ = ["ModelComparison"]

_LME, _BIC, _R2 = "LME (largest is best)", "BICint (smallest is best)", "pseudoR^2 (largest is best)"
_CV = "CV elpd (largest is best)"
_BIC_OPTIONS = ("nsamples", "seed", "convention", "max_elements")


def _bic_options(kwargs: dict | None) -> dict:
    """Keep the integrated-BIC options torchem uses (pyEM's ``func_output``/``nll_key`` are not needed)."""
    return {k: v for k, v in (kwargs or {}).items() if k in _BIC_OPTIONS}


def _score(model: EMModel, bic_kwargs: dict, noptions: int, r2_metric: str) -> dict[str, float]:
    _, lme, _ = model.compute_lme()
    return {"LME": lme, "BICint": model.compute_integrated_bic(**bic_kwargs),
            "pseudoR2": model.compute_pseudo_r2(noptions, r2_metric)}


class ModelComparison:
    """Compare candidate models fitted to the same subjects.

    Parameters
    ----------
    models : sequence of EMModel
        Candidate models (fitted or not; :meth:`compare` fits the others).
    names : sequence of str, optional
        One name per model (pyEM's keyword ``model_names`` is accepted);
        default ``Model_1``, ``Model_2``, ... as in pyEM.
    """

    def __init__(self, models: Sequence[EMModel], names: Sequence[str] | None = None, *,
                 model_names: Sequence[str] | None = None) -> None:
        if names is not None and model_names is not None:
            raise ValueError("give the names once: names or model_names")
        names = model_names if names is None else names
        if names is None:
            names = [f"Model_{i + 1}" for i in range(len(models))]
        if len(models) != len(names):
            raise ValueError(f"{len(models)} models but {len(names)} names")
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {list(names)}")
        self.models = list(models)
        self.names = list(names)
        self.bms_result: evidence.BMSResult | None = None
        self.cv_results: dict[str, CVResult] = {}
        self.identify_df: pd.DataFrame | None = None
        self.identify_rounds: pd.DataFrame | None = None

    def _fit_missing(self, fit_kwargs: dict | None = None) -> None:
        for m in self.models:
            if m.result is None:
                m.fit(**{"verbose": 0, **(fit_kwargs or {})})

    def subject_lme(self) -> pd.DataFrame:
        """Per-subject Laplace log evidence, subjects x models (fits unfitted models first)."""
        self._fit_missing()
        cols = {name: m.compute_lme()[0] for name, m in zip(self.names, self.models)}
        ids = self.models[0].batch.subject_ids
        n = {len(v) for v in cols.values()}
        if len(n) != 1:
            raise ValueError(f"models were fitted to different numbers of subjects: {sorted(n)}")
        return pd.DataFrame(cols, index=pd.Index(ids, name="subject"))

    def subject_cv(self, column: str = "elpd") -> pd.DataFrame:
        """Per-subject held-out log predictive likelihood (``"elpd"``, or ``"map"``), subjects x models.

        Needs :meth:`compare` with ``cv=...`` (or :meth:`cross_validate`) first.
        """
        if set(self.cv_results) != set(self.names):
            raise RuntimeError("cross-validate the models first: compare(cv='blocks') or cross_validate()")
        return pd.DataFrame({name: self.cv_results[name].subjects[column] for name in self.names})

    def cross_validate(self, folds: str | int = "blocks", **kwargs) -> pd.DataFrame:
        """Cross-validate every model (:meth:`EMModel.cross_validate`) and compare the held-out scores.

        Returns
        -------
        DataFrame
            :func:`torchem.crossval.compare_cv`: total held-out log predictive
            likelihood, its SE, the difference to the best model and the
            paired SE of that difference.  Results are kept in ``cv_results``.
        """
        self._fit_missing(kwargs.get("fit_kwargs"))
        self.cv_results = {name: m.cross_validate(folds, **kwargs) for name, m in zip(self.names, self.models)}
        return compare_cv(self.cv_results)

    def compare(self, bicint_kwargs: dict | None = None, r2_kwargs: dict | None = None,
                bms_kwargs: dict | None = None, fit_kwargs: dict | None = None, cv: str | int | dict | None = None,
                bms_evidence: str = "lme") -> pd.DataFrame:
        """Score every model; fit those not yet fitted.

        Parameters
        ----------
        bicint_kwargs : dict, optional
            Options of :meth:`EMModel.compute_integrated_bic` (``nsamples``,
            ``seed``, ``convention``); pyEM's ``func_output``/``nll_key`` are ignored.
        r2_kwargs : dict, optional
            ``noptions`` (default 2) and ``metric`` (``"median"``); pyEM's
            ``ntrials_total`` is ignored (torchem counts each subject's trials).
        bms_kwargs : dict, optional
            Options of :func:`torchem.evidence.bms`.
        fit_kwargs : dict, optional
            Options for models fitted here.
        cv : "blocks", int or dict, optional
            Also cross-validate every model (``folds``, or a dict of
            :meth:`EMModel.cross_validate` options) and add the held-out
            columns.
        bms_evidence : {"lme", "cv"}
            Per-subject evidence for random-effects BMS: the Laplace
            evidence, or the held-out log predictive likelihood (needs ``cv``).

        Returns
        -------
        DataFrame
            Indexed by model name: ``LME (largest is best)``, ``BICint
            (smallest is best)``, ``pseudoR^2 (largest is best)``, their
            differences to the best model (``dLME``, ``dBICint``,
            ``dpseudoR^2``), and random-effects BMS columns ``exp_r``
            (expected frequency), ``xp`` (exceedance probability), ``pxp``
            (protected exceedance probability) and ``BOR`` (omnibus risk,
            the same for every row).  The BMS result is kept in ``bms_result``.
            With ``cv``: ``CV elpd (largest is best)`` (summed held-out log
            predictive likelihood), ``CV SE``, ``dCV`` (difference to the best
            model) and ``dCV SE`` (paired SE over subjects).
        """
        if bms_evidence not in ("lme", "cv"):
            raise ValueError(f"bms_evidence must be 'lme' or 'cv', got {bms_evidence!r}")
        if bms_evidence == "cv" and cv is None:
            raise ValueError("bms_evidence='cv' needs cv=... (the held-out scores)")
        self._fit_missing(fit_kwargs)
        r2 = dict(r2_kwargs or {})
        bic = _bic_options(bicint_kwargs)
        rows = [_score(m, bic, int(r2.get("noptions", 2)), r2.get("metric", "median")) for m in self.models]
        df = pd.DataFrame(rows, index=pd.Index(self.names, name="model")).rename(
            columns={"LME": _LME, "BICint": _BIC, "pseudoR2": _R2})
        df["dLME"] = df[_LME] - df[_LME].max()
        df["dBICint"] = df[_BIC] - df[_BIC].min()
        df["dpseudoR^2"] = df[_R2] - df[_R2].max()
        if cv is not None:
            opts = dict(cv) if isinstance(cv, dict) else {"folds": cv}
            held = self.cross_validate(**opts)
            df[_CV] = held["elpd"]
            df["CV SE"] = held["se"]
            df["dCV"] = held["d_elpd"]
            df["dCV SE"] = held["d_se"]
        per_subject = self.subject_cv() if bms_evidence == "cv" else self.subject_lme()
        self.bms_result = evidence.bms(per_subject, **(bms_kwargs or {}))
        df["exp_r"] = self.bms_result.exp_r
        df["xp"] = self.bms_result.xp
        df["pxp"] = self.bms_result.pxp
        df["BOR"] = self.bms_result.bor
        df.attrs["warnings"] = self._family_warnings()
        for text in df.attrs["warnings"]:
            warnings.warn(text, RuntimeWarning, stacklevel=2)
        return df

    def _family_warnings(self) -> list[str]:
        """A note when models with different group families are compared by their Laplace LME."""
        results = [m.result for m in self.models]
        bound = [n for n, r in zip(self.names, results) if r.lme is not None]
        if not bound or len({r.group_name for r in results}) == 1:
            return []
        return [f"the LME of {', '.join(map(str, bound))} is the variational lower bound of a heavy-tailed group, "
                "looser than a Gaussian group's Laplace LME where the data inform a parameter weakly; compare "
                "group families by BICint or compute_lme(method='importance')"]

    def identify(
        self,
        mi_inputs: Sequence[str] | None = None,
        nrounds: int = 10,
        nsubjects: int = 100,
        sim_kwargs: dict | None = None,
        fit_kwargs: dict | None = None,
        seed: int | None = 0,
        verbose: int = 1,
        bicint_kwargs: dict | None = None,
        r2_kwargs: dict | None = None,
        param_samplers: dict[str, Callable[[np.random.Generator, int], np.ndarray]] | None = None,
    ) -> pd.DataFrame:
        """Model identifiability: simulate from each model, fit all models, count the winners.

        In each round, every model simulates ``nsubjects`` agents whose
        normalized parameters are drawn from a standard normal and mapped
        through the model's transforms; every model is fitted to every
        simulated data set (each data set is built once and shared by the
        fits) and scored by LME, integrated BIC and pseudo-R².  A model
        without data (``all_data=None``) takes the last round's data simulated
        from itself and its fit to them.

        Parameters
        ----------
        mi_inputs : list of str, optional
            Simulator outputs the fit functions take (default: each model's inputs).
        nrounds, nsubjects : int
            Rounds and simulated subjects per data set.
        sim_kwargs : dict, optional
            Simulator options (``nblocks``, ``ntrials``, ...).
        fit_kwargs : dict, optional
            Fit options (``mstep_maxit``, ...).
        seed : int, optional
            Seed of the parameter draws and simulations.
        verbose : int
            A tqdm bar over rounds.
        bicint_kwargs, r2_kwargs : dict, optional
            As in :meth:`compare` (default 1000 samples for the integrated BIC).
        param_samplers : dict, optional
            Per model name, ``sampler(rng, n) -> (n, P)`` natural parameters
            to simulate with instead of the standard-normal draws (e.g. to
            simulate a two-learning-rate model with clearly different rates).

        Returns
        -------
        DataFrame
            One row per (Simulated, Estimated) pair: mean ``LME``, ``BICint``,
            ``pseudoR2`` over rounds and the rounds won ``bestlme``,
            ``bestbic``, ``bestR2``.  The per-round scores are kept in
            ``identify_rounds``.

        Under a process group (``torchrun``) the data sets (one per round and
        simulating model) are spread over the ranks and fitted in one process
        each; every rank returns the whole table.  A model without data adopts
        the last round's fit on the rank that ran it.
        """
        for m in self.models:
            if m.simulate_func is None:
                raise ValueError("identify needs a simulate_func for every model")
        bic = {"nsamples": 1000, **_bic_options(bicint_kwargs)}
        r2 = dict(r2_kwargs or {})
        rng = np.random.default_rng(seed)
        rows, own = [], {}
        # under a process group the data sets (round x simulating model) are spread over the ranks, each fitted in
        # one process; every rank draws every data set's parameters and seed, so each data set is the same
        ctx = distributed.context(self.models[0].device)
        rank, world = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)
        for rnd in tqdm(range(nrounds), desc="identify", disable=not verbose or rank != 0):
            for k, (sim_name, sim_model) in enumerate(zip(self.names, self.models)):
                sampler = (param_samplers or {}).get(sim_name)
                if sampler is not None:
                    natural = np.asarray(sampler(rng, nsubjects), dtype=float)
                else:
                    norm = rng.standard_normal((nsubjects, sim_model.model.n_params))
                    natural = sim_model.model.to_natural(torch.as_tensor(norm)).numpy()
                sim_seed = int(rng.integers(2**31))
                if (rnd * len(self.models) + k) % world != rank:
                    continue
                kwargs = dict(sim_kwargs or {})
                if "seed" in inspect.signature(sim_model.simulate_func).parameters:
                    kwargs["seed"] = sim_seed
                sim = sim_model.simulate(natural, **kwargs)
                keys = list(mi_inputs or sim_model.model.inputs or [])
                all_data = [[sim[k][i] for k in keys] for i in range(nsubjects)]
                batch = None
                for est_name, est_model in zip(self.names, self.models):
                    twin = est_model.with_data(batch if batch is not None else all_data, input_names=keys)
                    batch = twin.batch  # validated and on the device: shared by the other fits
                    with distributed.local():
                        twin.fit(**{"verbose": 0, "seed": sim_seed, **(fit_kwargs or {})})
                        score = _score(twin, bic, int(r2.get("noptions", 2)), r2.get("metric", "median"))
                    if est_name == sim_name:
                        own[sim_name] = twin
                    rows.append({"round": rnd, "Simulated": sim_name, "Estimated": est_name, **score})
        if ctx is not None:  # every rank's rows, in the order of one process
            order = {(n, e): i for i, (n, e) in enumerate((a, b) for a in self.names for b in self.names)}
            rows = sorted((r for part in ctx.all_gather_object(rows) for r in part),
                          key=lambda r: (r["round"], order[(r["Simulated"], r["Estimated"])]))
        per_round = pd.DataFrame(rows)
        grp = per_round.groupby(["round", "Simulated"])
        per_round["bestlme"] = per_round["LME"] == grp["LME"].transform("max")
        per_round["bestbic"] = per_round["BICint"] == grp["BICint"].transform("min")
        per_round["bestR2"] = per_round["pseudoR2"] == grp["pseudoR2"].transform("max")
        out = per_round.groupby(["Simulated", "Estimated"], sort=False).agg(
            LME=("LME", "mean"), BICint=("BICint", "mean"), pseudoR2=("pseudoR2", "mean"),
            bestlme=("bestlme", "sum"), bestbic=("bestbic", "sum"), bestR2=("bestR2", "sum"),
        ).reset_index()
        for col in ("bestlme", "bestbic", "bestR2"):
            out[col] = out[col].astype(int)
        self.identify_rounds, self.identify_df = per_round, out
        for name, m in zip(self.names, self.models):
            if m.batch is None and name in own:
                m._adopt(own[name])
        return out

    def plot_identifiability(self, metric: str = "LME", ax=None, cmap: str = "Blues"):
        """Simulated x estimated matrix of the share of rounds each estimated model won.

        Parameters
        ----------
        metric : {"LME", "BICint", "pseudoR2"}
            Which winner count to show.

        Returns
        -------
        matplotlib.figure.Figure
        """
        if self.identify_df is None:
            raise RuntimeError("run identify() first")
        col = {"LME": "bestlme", "BICint": "bestbic", "pseudoR2": "bestR2", "R2": "bestR2"}.get(metric)
        if col is None:
            raise ValueError(f"metric must be 'LME', 'BICint' or 'pseudoR2', got {metric!r}")
        nrounds = int(self.identify_rounds["round"].nunique())
        table = self.identify_df.pivot(index="Simulated", columns="Estimated", values=col)
        table = table.loc[self.names, self.names] / nrounds
        return plotting.plot_matrix(table, title=f"Identifiability ({metric}): share of rounds won",
                                    xlabel="Estimated model", ylabel="Simulated model", ax=ax, cmap=cmap)
