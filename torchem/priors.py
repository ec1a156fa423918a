"""Fixed priors over the normalized parameters: Gaussian, Laplace, Student-t, Cauchy, Uniform, Independent.

A prior is a distribution over one subject's ``P`` normalized parameters.  It
gives the negative log density ``(S,)`` of points ``x`` ``(S, P)`` (exactly,
normalizing constant included, differentiable by autograd), its Hessian
``(S, P, P)``, draws, and its mean and variance per parameter.  The group
families of :mod:`torchem.groups` are priors whose hyperparameters the
M-step re-estimates; the classes here are also what a user passes as
``fit(prior=...)`` (the distribution that starts EM and is used until the
first valid M-step) or ``fit_individual(prior=...)`` (a fixed prior for
non-hierarchical MAP fits).

Values may be given as floats, lists, numpy arrays or tensors; a scalar is
broadcast to every parameter.  ``prior.to(device, dtype)`` returns a copy on
the fit's device and dtype (the engine does this).  pyEM's names are kept:
``GaussianPrior(mu, sigma)`` takes *variances* in ``sigma``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch

__all__ = ["Prior", "GaussianPrior", "LaplacePrior", "StudentTPrior", "CauchyPrior", "UniformPrior",
           "IndependentPrior", "as_tensor", "chi2_draws"]


def as_tensor(value: Any, n: int | None = None, *, name: str = "value", dtype=torch.float64,
              device=None) -> torch.Tensor:
    """``value`` as a float tensor, broadcast to ``(n,)`` when ``n`` is given; non-finite values are refused."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        t = value.detach().clone()
    else:
        t = torch.as_tensor(value, dtype=dtype, device=device).clone()
    if n is not None:
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(n).clone()
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} values for {n} parameters")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t


def _positive(t: torch.Tensor, name: str) -> torch.Tensor:
    if not bool((t > 0).all()):
        raise ValueError(f"{name} must be positive, got {t.tolist()}")
    return t


class Prior:
    """A distribution over the ``P`` normalized parameters of one subject.

    Subclasses implement :meth:`neg_log_prior`, :meth:`hessian`,
    :meth:`sample`, :attr:`mean` and :attr:`var`.  ``idx`` arguments name the
    subjects the rows of ``x`` belong to; the priors here are the same for
    every subject and ignore it (a group with covariates would not).
    """

    @property
    def n_params(self) -> int:
        return int(self.mean.shape[0])

    def neg_log_prior(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(S,)`` negative log density of ``x`` ``(S, P)``."""
        raise NotImplementedError

    def grad(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(S, P)`` gradient of :meth:`neg_log_prior` (autograd unless a subclass knows it)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.neg_log_prior(xg, idx).sum(), xg)
        return g

    def hessian(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(S, P, P)`` Hessian of :meth:`neg_log_prior` at ``x``."""
        raise NotImplementedError

    def curvature(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(S, P, P)`` prior curvature used for the Laplace posterior at a MAP ``x`` (default: :meth:`hessian`)."""
        return self.hessian(x, idx)

    def sample(self, n: int, generator: torch.Generator | None = None,
               idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, P)`` draws; the random stream comes from ``generator`` on the CPU."""
        raise NotImplementedError

    def local(self, m: torch.Tensor | None, v: torch.Tensor | None) -> "Prior":
        """The prior an E-step uses, given every subject's last posterior means ``m`` and variances ``v``.

        ``m``, ``v``: ``(S, P)``, or ``None`` before the first E-step.  A
        fixed prior and a Gaussian group return themselves (their MAP and
        Hessian give the Laplace posterior).  The heavy-tailed group families
        return a per-subject prior whose MAP and Hessian are each subject's
        variational Gaussian posterior (:class:`torchem.groups.LocalPrior`).
        """
        return self

    @property
    def mean(self) -> torch.Tensor:
        """``(P,)`` location (the mean where it exists)."""
        raise NotImplementedError

    @property
    def var(self) -> torch.Tensor:
        """``(P,)`` variance per parameter (see each class for heavy tails)."""
        raise NotImplementedError

    @property
    def cov(self) -> torch.Tensor:
        """``(P, P)`` covariance (diagonal unless the class has correlations)."""
        return torch.diag(self.var)

    @property
    def spread(self) -> torch.Tensor:
        """``(P, P)`` finite width used to cap Laplace posteriors and to stand in for a bad inverse Hessian."""
        return self.cov

    def start(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, P)`` starting points for MAP searches: the location plus small N(0, 0.1^2) jitter."""
        return self.mean + 0.1 * self._randn(n, generator)

    def to(self, device=None, dtype=None) -> "Prior":
        """A copy with every tensor on ``device`` / ``dtype``."""
        changes = {f.name: getattr(self, f.name).to(device=device, dtype=dtype)
                   for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **changes)

    def _randn(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        ref = self.mean
        return torch.randn(n, ref.shape[0], generator=generator, dtype=ref.dtype).to(ref.device)

    def _rand(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        ref = self.mean
        return torch.rand(n, ref.shape[0], generator=generator, dtype=ref.dtype).to(ref.device)

    def logpdf(self, x: Any) -> float:
        """pyEM's method: the log density of one parameter vector ``x`` ``(P,)`` (float)."""
        t = torch.as_tensor(x, dtype=self.mean.dtype, device=self.mean.device).reshape(1, -1)
        return float(-self.neg_log_prior(t)[0])

    def describe(self) -> str:
        """One line naming the distribution and its values."""
        parts = [f"{f.name}={_short(getattr(self, f.name))}" for f in fields(self)]
        return f"{type(self).__name__}({', '.join(parts)})"

    def __repr__(self) -> str:
        return self.describe()


def _short(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return "[" + ", ".join(f"{float(a):.4g}" for a in v.reshape(-1)) + "]"
    return repr(v)


@dataclass(repr=False)
class GaussianPrior(Prior):
    """Gaussian ``N(mu, cov)``; pyEM's ``GaussianPrior(mu, sigma)`` with ``sigma`` holding variances.

    Parameters
    ----------
    mu : array-like
        ``(P,)`` mean.
    sigma : array-like, optional
        ``(P,)`` variances (pyEM's name), or a ``(P, P)`` covariance matrix.
    """

    mu: torch.Tensor
    sigma: torch.Tensor

    def __post_init__(self) -> None:
        self.mu = as_tensor(self.mu, name="prior mu").reshape(-1)
        P = self.mu.shape[0]
        s = as_tensor(self.sigma, name="prior sigma (variances)")
        if s.dim() == 2:
            if s.shape != (P, P):
                raise ValueError(f"prior covariance has shape {tuple(s.shape)}, expected ({P}, {P})")
            s = 0.5 * (s + s.T)
            if torch.linalg.cholesky_ex(s)[1] != 0:
                raise ValueError("prior covariance must be positive definite")
        else:
            s = _positive(as_tensor(s, P, name="prior sigma (variances)"), "prior sigma (variances)")
            s = torch.diag(s)
        self.sigma = s.to(self.mu)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def cov(self) -> torch.Tensor:
        return self.sigma

    @property
    def var(self) -> torch.Tensor:
        return self.sigma.diagonal()

    @property
    def precision(self) -> torch.Tensor:
        """``(P, P)`` inverse covariance."""
        return torch.cholesky_inverse(torch.linalg.cholesky(self.sigma))

    def neg_log_prior(self, x, idx=None):
        P = x.shape[-1]
        chol = torch.linalg.cholesky(self.sigma)
        z = torch.linalg.solve_triangular(chol, (x - self.mu).unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2.0 * chol.diagonal().log().sum()
        return 0.5 * (z * z).sum(-1) + 0.5 * logdet + 0.5 * P * math.log(2 * math.pi)

    def grad(self, x, idx=None):
        return (x - self.mu) @ self.precision

    def hessian(self, x, idx=None):
        return self.precision.expand(x.shape[0], -1, -1)

    def sample(self, n, generator=None, idx=None):
        return self.mu + self._randn(n, generator) @ torch.linalg.cholesky(self.sigma).T


@dataclass(repr=False)
class LaplacePrior(Prior):
    """Independent Laplace ``(1 / 2b) exp(-|x - loc| / b)`` per parameter; variance ``2 b^2``.

    The exact density has a kink at ``loc``, where a subject with a weak
    likelihood has its MAP: there the gradient never vanishes and the
    Hessian does not exist, so MAP searches stall and the Laplace posterior
    is undefined.  ``|d|`` is therefore evaluated as
    ``sqrt(d^2 + eps^2) - eps`` with ``eps = smooth * b`` (default
    ``smooth = 1e-3``): identical to ``|d|`` within ``eps``, smooth, and with
    curvature ``1 / (b eps)`` at the location, so a MAP there gets a narrow,
    positive definite posterior, as the kink implies.
    """

    loc: torch.Tensor
    scale: torch.Tensor
    smooth: float = 1e-3

    def __post_init__(self) -> None:
        self.loc = as_tensor(self.loc, name="prior loc").reshape(-1)
        self.scale = _positive(as_tensor(self.scale, self.loc.shape[0], name="prior scale"), "prior scale").to(self.loc)

    @property
    def mean(self):
        return self.loc

    @property
    def var(self):
        return 2.0 * self.scale ** 2

    def neg_log_prior(self, x, idx=None):
        eps = self.smooth * self.scale
        d = x - self.loc
        return ((torch.sqrt(d * d + eps * eps) - eps) / self.scale + torch.log(2.0 * self.scale)).sum(-1)

    def hessian(self, x, idx=None):
        eps = self.smooth * self.scale
        d = x - self.loc
        return torch.diag_embed(eps * eps / (self.scale * (d * d + eps * eps) ** 1.5))

    def curvature(self, x, idx=None):
        """The smoothed kink's curvature, capped at ``1 / (2 b^2)``: at the location the Laplace posterior
        of a weakly informed subject is the Gaussian with the prior's variance, not a spike."""
        return torch.minimum(self.hessian(x, idx), torch.diag_embed((0.5 / self.scale ** 2).expand_as(x)))

    def sample(self, n, generator=None, idx=None):
        u = self._rand(n, generator).clamp(1e-16, 1 - 1e-16) - 0.5
        return self.loc - self.scale * u.sign() * torch.log1p(-2.0 * u.abs())


@dataclass(repr=False)
class StudentTPrior(Prior):
    """Independent Student-t per parameter with location ``loc``, scale ``scale`` and ``df`` degrees of freedom.

    ``var`` is ``scale^2 df / (df - 2)`` for ``df > 2``; for heavier tails
    (no finite variance) it reports pyEM's stand-in ``100 scale^2``.
    ``spread`` (used to cap posteriors) is ``scale^2`` then.
    """

    loc: torch.Tensor
    scale: torch.Tensor
    df: float = 8.0

    def __post_init__(self) -> None:
        self.loc = as_tensor(self.loc, name="prior loc").reshape(-1)
        self.scale = _positive(as_tensor(self.scale, self.loc.shape[0], name="prior scale"), "prior scale").to(self.loc)
        self.df = float(self.df)
        if not (self.df > 0 and math.isfinite(self.df)):
            raise ValueError(f"df must be positive and finite, got {self.df}")

    @property
    def mean(self):
        return self.loc

    @property
    def var(self):
        s2 = self.scale ** 2
        return s2 * self.df / (self.df - 2.0) if self.df > 2 else 100.0 * s2

    @property
    def spread(self):
        s2 = self.scale ** 2
        return torch.diag(s2 * self.df / (self.df - 2.0) if self.df > 2 else s2)

    def neg_log_prior(self, x, idx=None):
        df = self.df
        z2 = ((x - self.loc) / self.scale) ** 2
        const = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        return (0.5 * (df + 1) * torch.log1p(z2 / df) + torch.log(self.scale) - const).sum(-1)

    def hessian(self, x, idx=None):
        d2 = (x - self.loc) ** 2
        a = self.df * self.scale ** 2
        return torch.diag_embed((self.df + 1) * (a - d2) / (a + d2) ** 2)

    def sample(self, n, generator=None, idx=None):
        z = self._randn(n, generator)
        u = chi2_draws(n * self.n_params, self.df, generator, self.loc.dtype).reshape(n, -1).to(self.loc.device)
        return self.loc + self.scale * z * torch.sqrt(self.df / u)


def chi2_draws(n: int, df: float, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """``n`` chi-square draws with ``df`` degrees of freedom from a seeded CPU generator (Marsaglia-Tsang)."""
    shape = df / 2.0
    boost = shape < 1.0
    a = shape + 1.0 if boost else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=dtype)
    filled = 0
    while filled < n:
        m = 2 * (n - filled) + 16
        x = torch.randn(m, generator=generator, dtype=dtype)
        v = (1.0 + c * x) ** 3
        unif = torch.rand(m, generator=generator, dtype=dtype)
        ok = (v > 0) & (torch.log(unif) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        acc = (d * v)[ok][: n - filled]
        out[filled:filled + acc.numel()] = acc
        filled += acc.numel()
    if boost:
        out = out * torch.rand(n, generator=generator, dtype=dtype) ** (1.0 / shape)
    return 2.0 * out


def CauchyPrior(loc: Any, scale: Any) -> StudentTPrior:  # noqa: N802 - pyEM's class name
    """Independent Cauchy prior: a Student-t with one degree of freedom."""
    return StudentTPrior(loc, scale, df=1.0)


@dataclass(repr=False)
class UniformPrior(Prior):
    """Independent uniform (box) prior on ``[lo, hi]`` per parameter (in normalized space).

    Points outside the box have infinite negative log density: MAP searches
    start inside and never leave it.
    """

    lo: torch.Tensor
    hi: torch.Tensor

    def __post_init__(self) -> None:
        self.lo = as_tensor(self.lo, name="prior lo").reshape(-1)
        self.hi = as_tensor(self.hi, self.lo.shape[0], name="prior hi").to(self.lo)
        if not bool((self.hi > self.lo).all()):
            raise ValueError(f"UniformPrior needs hi > lo for every parameter, got lo={self.lo.tolist()}, "
                             f"hi={self.hi.tolist()}")

    @property
    def mean(self):
        return 0.5 * (self.lo + self.hi)

    @property
    def var(self):
        return (self.hi - self.lo) ** 2 / 12.0

    def neg_log_prior(self, x, idx=None):
        inside = ((x >= self.lo) & (x <= self.hi)).all(-1)
        val = torch.log(self.hi - self.lo).sum() + 0.0 * x.sum(-1)
        return torch.where(inside, val, torch.full_like(val, math.inf))

    def hessian(self, x, idx=None):
        return torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)

    def sample(self, n, generator=None, idx=None):
        return self.lo + (self.hi - self.lo) * self._rand(n, generator)

    def start(self, n, generator=None):
        half = 0.5 * (self.hi - self.lo)
        return self.mean + 0.1 * half.clamp(max=1.0) * self._randn(n, generator).clamp(-3, 3) / 3


@dataclass(repr=False)
class IndependentPrior(Prior):
    """One one-dimensional prior per parameter (each a prior of one parameter), in parameter order."""

    priors: Sequence[Prior]

    def __post_init__(self) -> None:
        self.priors = list(self.priors)
        if not self.priors:
            raise ValueError("IndependentPrior needs at least one prior")
        for j, p in enumerate(self.priors):
            if not isinstance(p, Prior):
                raise ValueError(f"IndependentPrior entry {j} is {type(p).__name__}, not a prior")
            if p.n_params != 1:
                raise ValueError(f"IndependentPrior entry {j} is a prior of {p.n_params} parameters; each "
                                 "entry must be one-dimensional")

    def to(self, device=None, dtype=None):
        return IndependentPrior([p.to(device, dtype) for p in self.priors])

    def _cols(self, x):
        return [x[:, j:j + 1] for j in range(len(self.priors))]

    @property
    def mean(self):
        return torch.cat([p.mean for p in self.priors])

    @property
    def var(self):
        return torch.cat([p.var for p in self.priors])

    @property
    def spread(self):
        return torch.diag(torch.cat([p.spread.diagonal() for p in self.priors]))

    def neg_log_prior(self, x, idx=None):
        return sum(p.neg_log_prior(c, idx) for p, c in zip(self.priors, self._cols(x)))

    def hessian(self, x, idx=None):
        return torch.diag_embed(torch.cat([p.hessian(c, idx)[:, :, 0] for p, c in zip(self.priors, self._cols(x))], 1))

    def sample(self, n, generator=None, idx=None):
        return torch.cat([p.sample(n, generator) for p in self.priors], 1)

    def start(self, n, generator=None):
        return torch.cat([p.start(n, generator) for p in self.priors], 1)

    def describe(self) -> str:
        return "IndependentPrior([" + ", ".join(p.describe() for p in self.priors) + "])"
