"""Every option of a hierarchical fit, in one dataclass.

:class:`FitOptions` is the single place where a fit option is named,
defaulted, documented and checked.  ``EMModel.fit(**options)``,
:func:`torchem.em.run_em`, the command line (``torchem fit``), the dashboard
and the README's option table all read it: the help text of each field is
its ``metadata["help"]``.  pyEM's names are accepted where pyEM has them
(``mstep`` for ``group``, ``convergence_type``, ``prior_mu``/``prior_sigma``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from .groups import FAMILIES, GroupFamily
from .priors import GaussianPrior, Prior

__all__ = ["FitOptions", "option_table", "add_arguments", "options_from_args"]


def _opt(default: Any, help: str, *, cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass
class FitOptions:
    """Options of a hierarchical EM fit (see each field's ``help``; ``option_table()`` lists them)."""

    group: Any = _opt("gaussian", "group distribution: 'gaussian' (or 'diag'), 'full' (full covariance), "
                                  "'laplace', 'student_t', 'cauchy', or a GroupFamily instance")
    mstep: Any = _opt(None, "pyEM's name for `group` ('gaussian', 'laplace', 'student_t', 'cauchy')", cli=False)
    df: float = _opt(8.0, "degrees of freedom of the 'student_t' group")
    variational: bool = _opt(True, "laplace, student_t and cauchy groups: E-steps fit each subject's "
                                   "variational Gaussian posterior under the group (unbiased at the Laplace "
                                   "kink; no collapsing t scale); False: the MAP under the group density, "
                                   "as pyEM")
    covariates: Any = _opt(None, "subject covariates of the group mean, mu_i = X_i B (torchem.covariates): a "
                                 "DataFrame indexed by subject id, or an array with one row per subject; "
                                 "categorical columns are dummy coded, an intercept is added", cli=False)
    formula: Any = _opt(None, "which covariates enter which parameter's group mean: '~ group + age' for every "
                              "parameter, or {'alpha': '~ group', 'beta': '~ 1'}; '0 +' or '- 1' drops the "
                              "intercept; default every covariate column and an intercept", cli=False)
    prior: Any = _opt(None, "prior object (torchem.priors) used by the first E-step, until the first valid "
                            "M-step; default: the group family at mean 0, variance `init_var`", cli=False)
    prior_mu: Any = _opt(None, "mean of a Gaussian starting prior (pyEM); give with `prior_sigma`", cli=False)
    prior_sigma: Any = _opt(None, "variances of a Gaussian starting prior (pyEM); give with `prior_mu`", cli=False)
    init_var: float = _opt(1.0, "variance of the default starting prior (mean 0); pyEM starts at 100 and "
                                "reaches the same fixed point in more iterations")
    mstep_maxit: int = _opt(800, "maximum E-steps (EM iterations; accelerated cycles count each E-step)")
    accelerate: Any = _opt("auto", "which group each E-step runs at: 'auto' (quasi_newton for a Gaussian group, "
                                   "squarem for the heavy-tailed ones), 'quasi_newton' (multisecant quasi-Newton "
                                   "steps on EM's fixed-point residual), 'squarem' (Varadhan & Roland 2008) or "
                                   "None (plain EM); all reach plain EM's fixed point")
    convergence: Any = _opt(None, "stopping rule: 'lme' (the estimated remaining change of the summed "
                                  "Laplace log evidence below `convergence_crit` and of every group "
                                  "hyperparameter below `group_tol`), 'npl' (pyEM's rule on the NPL), 'group' (every "
                                  "group hyperparameter stable for `group_window` steps); default 'lme', or "
                                  "'npl' when one of pyEM's NPL-rule options below is given")
    convergence_crit: float = _opt(1e-3, "tolerance of the 'lme' and 'npl' rules (nats; relative for "
                                         "convergence_custom='relative_npl')")
    convergence_type: Any = _opt(None, "pyEM's name: 'NPL' selects convergence='npl', 'LME' "
                                       "convergence='lme'", cli=False)
    convergence_method: str = _opt("sum", "'npl' rule: aggregate the subjects' NPL by 'sum', 'mean' or 'median'")
    convergence_custom: Any = _opt(None, "'npl' rule variant: None (change between steps), 'relative_npl' "
                                         "(relative change), 'running_average' (change from the mean of the "
                                         "last 5)")
    convergence_precision: int = _opt(6, "'npl' rule: decimals each subject's NPL is rounded to (pyEM)")
    group_tol: float = _opt(1e-3, "'group' rule, and the importance E-step: largest relative change "
                                  "|new - old| / (1 + |old|) of a group location or scale")
    group_window: int = _opt(3, "'group' rule: consecutive steps that must stay within `group_tol`")
    seed: Any = _opt(0, "seed of starting points, restarts and importance draws; the same seed on the same "
                        "device gives identical results")
    max_restarts: int = _opt(2, "restarts from draws of the group for subjects whose E-step fails")
    estep_maxit: int = _opt(200, "L-BFGS iterations per subject and E-step")
    gtol: float = _opt(1e-5, "E-step gradient tolerance (largest absolute gradient entry, as scipy's BFGS); at least "
                                 "sqrt(machine epsilon), 3.5e-4 in float32")
    chunk_size: Any = _opt(None, "subjects per E-step chunk (MAP search, Hessians, evidence), so that peak memory "
                                 "is bounded by the chunk: None (all at once), an integer, or 'auto' (a size "
                                 "from the device's free memory; on the CPU at most 10^6 trial cells, which "
                                 "stay in the processor's caches)")
    pin_data: bool = _opt(False, "keep the data in pinned host memory during the fit and copy each E-step chunk "
                                 "to the device (non_blocking), so that device memory holds one chunk's data "
                                 "(with chunk_size; pinning needs CUDA, on the CPU the chunks are only sliced)")
    hessian_chunk: int = _opt(20000, "subjects per exact-Hessian evaluation (bounds memory)")
    laplace_cap: float = _opt(4.0, "largest ratio of a subject's Laplace posterior variance to the group's "
                                   "along any direction (math.inf: no cap); capped subjects are flagged")
    checkpoint: Any = _opt(None, "file the EM state is saved to every `checkpoint_every` E-steps (atomically: a "
                                 "temporary file, then a rename), for `resume`")
    checkpoint_every: int = _opt(10, "E-steps between checkpoints")
    resume: Any = _opt(None, "checkpoint file to continue from; the fit ends where an uninterrupted one ends "
                             "(same data and options required)")
    num_threads: Any = _opt(None, "torch intra-op threads during a CPU fit: None (one thread when an E-step chunk "
                                  "holds fewer than 10^6 trial cells, unless torch.set_num_threads or "
                                  "OMP_NUM_THREADS set a count; else torch's setting) or an integer")
    estep: str = _opt("laplace", "'laplace' (MAP and exact inverse Hessian) or 'importance' (importance-"
                                 "sampled posterior moments after Laplace EM converges)")
    nsamples: int = _opt(1000, "importance draws per subject and iteration")
    final_nsamples: Any = _opt(None, "importance draws of the final iteration (default 4 x nsamples)")
    proposal_df: float = _opt(5.0, "degrees of freedom of the importance proposal (Student-t)")
    min_ess: float = _opt(50.0, "subjects with a smaller effective sample size are redrawn with 4x the samples")

    def __post_init__(self) -> None:
        self.check()

    # ------------------------------------------------------------------ checks
    def check(self) -> "FitOptions":
        """Resolve pyEM's aliases and refuse bad values with a ``ValueError`` saying what is allowed."""
        if self.mstep is not None:
            if self.group not in ("gaussian", self.mstep):
                raise ValueError(f"give the group family once: group={self.group!r} and mstep={self.mstep!r}")
            self.group, self.mstep = self.mstep, None
        if not (isinstance(self.group, GroupFamily) or self.group in FAMILIES):
            raise ValueError(f"group must be one of {sorted(FAMILIES)} or a GroupFamily instance, got {self.group!r}")
        if self.formula is not None and self.covariates is None:
            raise ValueError("formula needs covariates=... (the table its names refer to)")
        if self.covariates is not None and (self.group == "laplace" or type(self.group).__name__ == "LaplaceGroup"):
            raise ValueError("covariates work with the gaussian ('gaussian'/'diag', 'full'), student_t and cauchy "
                             "groups, not 'laplace': a Laplace location regression (least absolute deviations under "
                             "posterior uncertainty) has no closed-form M-step")
        if self.convergence_type is not None:
            kind = str(self.convergence_type).upper()
            if kind not in ("NPL", "LME"):
                raise ValueError(f"convergence_type must be 'NPL' or 'LME', got {self.convergence_type!r}")
            self.convergence, self.convergence_type = kind.lower(), None
        if self.convergence is None:  # pyEM's NPL-rule options select pyEM's rule
            npl_options = (self.convergence_method != "sum" or self.convergence_custom is not None
                           or self.convergence_precision != 6)
            self.convergence = "npl" if npl_options else "lme"
        _choice("convergence", self.convergence, ("lme", "npl", "group"))
        _choice("convergence_method", self.convergence_method, ("sum", "mean", "median"))
        _choice("convergence_custom", self.convergence_custom, (None, "relative_npl", "running_average"))
        _choice("accelerate", self.accelerate, (None, "auto", "squarem", "quasi_newton"))
        _choice("estep", self.estep, ("laplace", "importance"))
        _choice("variational", self.variational, (True, False))
        _positive_int("mstep_maxit", self.mstep_maxit)
        _positive_int("estep_maxit", self.estep_maxit)
        _positive_int("hessian_chunk", self.hessian_chunk)
        _positive_int("checkpoint_every", self.checkpoint_every)
        if self.num_threads is not None:
            _positive_int("num_threads", self.num_threads)
        if not isinstance(self.pin_data, bool):
            raise ValueError(f"pin_data must be True or False, got {self.pin_data!r}")
        for name in ("checkpoint", "resume"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a file path or None, got {value!r}")
        if self.chunk_size not in (None, "auto"):
            if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
                raise ValueError(f"chunk_size must be None, 'auto' or an integer >= 1, got {self.chunk_size!r}")
        _positive_int("nsamples", self.nsamples)
        _positive_int("group_window", self.group_window)
        if self.final_nsamples is not None:
            _positive_int("final_nsamples", self.final_nsamples)
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        if not isinstance(self.convergence_precision, int) or self.convergence_precision < 0:
            raise ValueError(f"convergence_precision must be an integer >= 0, got {self.convergence_precision!r}")
        for name in ("convergence_crit", "gtol", "init_var", "group_tol", "proposal_df", "df"):
            _positive(name, getattr(self, name))
        if not (isinstance(self.laplace_cap, (int, float)) and self.laplace_cap > 0):
            raise ValueError(f"laplace_cap must be a positive number (math.inf for no cap), got {self.laplace_cap!r}")
        if not (isinstance(self.min_ess, (int, float)) and self.min_ess >= 0):
            raise ValueError(f"min_ess must be a number >= 0, got {self.min_ess!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.prior is not None and (self.prior_mu is not None or self.prior_sigma is not None):
            raise ValueError("give either prior or prior_mu/prior_sigma, not both")
        if (self.prior_mu is None) != (self.prior_sigma is None):
            raise ValueError("give both prior_mu and prior_sigma (variances) for a Gaussian starting prior")
        if self.prior is not None and not isinstance(self.prior, Prior):
            raise ValueError(f"prior must be a prior object from torchem.priors, got {type(self.prior).__name__}")
        return self

    def starting_prior(self, n_params: int):
        """The user's starting prior as a :class:`~torchem.priors.Prior` of ``n_params`` parameters, or ``None``."""
        prior = self.prior
        if self.prior_mu is not None:
            prior = GaussianPrior(self.prior_mu, self.prior_sigma)
        if prior is not None and prior.n_params != n_params:
            raise ValueError(f"the prior has {prior.n_params} parameters, the model {n_params}")
        return prior

    @classmethod
    def names(cls) -> list[str]:
        """Every option name."""
        return [f.name for f in fields(cls)]


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def option_table() -> str:
    """The options as a Markdown table (name, default, meaning): the README's table is this output."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for f in fields(FitOptions):
        rows.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)


def _cli_type(f) -> Any:
    """Parser of one option's command-line text: numbers by the default's type, 'none' for None."""
    default = f.default

    def parse(text: str) -> Any:
        import argparse

        try:
            if text.lower() == "none":
                value = None
            elif f.name == "chunk_size":
                value = text if text == "auto" else int(text)
            elif isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"{f.name} must be true or false, got {text!r}")
                value = text.lower() in ("true", "1", "yes")
            elif isinstance(default, int) or f.name in ("final_nsamples", "seed", "num_threads"):
                value = int(text)
            elif isinstance(default, float):
                value = float(text)
            else:
                value = text
            FitOptions(**{f.name: value})  # the dataclass's own checks, at parse time
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    parse.__name__ = f.name  # argparse names the option in its error message
    return parse


def add_arguments(parser) -> None:
    """Add every command-line fit option of :class:`FitOptions` as ``--name`` (help text from its field).

    ``seed`` is left to the caller; ``--maxit`` is kept as a short name of ``--mstep-maxit``, and the
    importance E-step's ``nsamples`` is ``--estep-nsamples`` (``--nsamples`` counts integrated-BIC draws).
    """
    group = parser.add_argument_group("fit options (torchem.options.FitOptions; 'none' for None)")
    rename = {"nsamples": "estep_nsamples"}
    for f in fields(FitOptions):
        if not f.metadata.get("cli") or f.name == "seed":
            continue
        flags = ["--" + rename.get(f.name, f.name).replace("_", "-")] + (["--maxit"] if f.name == "mstep_maxit" else [])
        choices = sorted(FAMILIES) if f.name == "group" else None
        group.add_argument(*flags, dest=f"opt_{f.name}", type=_cli_type(f), default=None, choices=choices,
                           help=f"{f.metadata['help']} (default {f.default!r})")


def options_from_args(args, **overrides: Any) -> FitOptions:
    """The :class:`FitOptions` of parsed command-line arguments (unset options keep their defaults)."""
    given = {name: getattr(args, f"opt_{name}") for name in FitOptions.names()
             if getattr(args, f"opt_{name}", None) is not None}
    return FitOptions(**{**given, **overrides})
