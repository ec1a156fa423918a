"""Checkpoints of a running EM fit, and resuming from them.

A checkpoint holds everything the EM loop's next step depends on (the
 current point at the top of the loop (its group, E-step and M-step), the
accelerator's memory (:meth:`~torchem.accelerators.Accelerator.state_dict`),
the E-step's warm-start state, the history, the stopping rule's memory and
the random generator's state), so that a resumed fit ends bit for bit where an uninterrupted one
ends on the CPU.  It also holds the options and a SHA-256 hash of the data:
resuming with other data or other options is refused.  Files are written to
a temporary name and renamed, so a fit killed while writing leaves the
previous checkpoint intact; they are read with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any

import torch

from .estep import PosteriorMoments
from .saving import _cpu_state, _options_json

if TYPE_CHECKING:  # pragma: no cover
    from .accelerators import Accelerator, Point
    from .em import EMRun

__all__ = ["save_checkpoint", "load_checkpoint", "data_hash"]

FORMAT = "torchem.checkpoint"
VERSION = 3
#: Options that may differ between the interrupted and the resumed fit (where and how, not what, is computed).
_FREE = ("checkpoint", "checkpoint_every", "resume", "chunk_size", "num_threads", "pin_data")


def data_hash(batch) -> str:
    """SHA-256 of the data, mask and subject ids of ``batch``."""
    h = hashlib.sha256()
    for t in (*batch.data, batch.mask):
        c = t.detach().cpu().contiguous()
        h.update(f"{c.dtype}{tuple(c.shape)}".encode())
        h.update(memoryview(c.numpy()).cast("B"))  # hashed in place, no copy of the data
    h.update(json.dumps([str(s) for s in batch.subject_ids]).encode())
    return h.hexdigest()


def _fingerprint(run: "EMRun") -> dict:
    opts = {k: v for k, v in (_options_json(run.opts) or {}).items() if k not in _FREE}
    for f in fields(run.opts):  # objects (a prior, a group instance) by their description
        v = getattr(run.opts, f.name)
        if f.name not in opts and f.name not in _FREE and v is not None:
            opts[f.name] = repr(v)
    if getattr(run, "_data_hash", None) is None:  # hashed once per fit
        run._data_hash = data_hash(run.batch)
    return {"options": opts, "params": list(run.model.param_names), "dtype": str(run.dtype),
            "data": run._data_hash}


def _post_tensors(post: PosteriorMoments) -> dict:
    return {f.name: getattr(post, f.name).detach().cpu() for f in fields(PosteriorMoments) if f.name != "importance"}


def save_checkpoint(run: "EMRun", current: "Point", acc: "Accelerator", rule: Any, path: str | os.PathLike) -> None:
    """Write the EM state at the top of the loop to ``path`` (atomically)."""
    post, group, prior = run.last
    lik = run.laplace.lik
    payload = {
        "format": FORMAT, "version": VERSION,
        "meta": json.dumps({**_fingerprint(run), "rows": run.rows, "warnings": run.warnings,
                            "rule": asdict(rule), "gap": None if run.gap is None else run.gap.as_dict(),
                            "probed": {str(k): v for k, v in run._probed.items()}, "mstep_ok": run._mstep_ok, "restart_seed": run.laplace.restart_seed,
                            "converged": run.converged}),
        "groups": {"a": _cpu_state(current.group.state_dict()), "b": _cpu_state(current.mapped.state_dict()),
                   "last_group": _cpu_state(group.state_dict()), "last_prior": _cpu_state(prior.state_dict()),
                   **({} if run._previous is None else {"previous": _cpu_state(run._previous.state_dict())})},
        "post_a": _post_tensors(current.post), "last_post": _post_tensors(post),
        "accelerator": acc.state_dict(),
        "estep": {"x": run.laplace.x.cpu(), "has_lik": run.laplace.has_lik.cpu(),
                  "nll": lik[0].cpu(), "grad": lik[1].cpu(), "hess": lik[2].cpu(), "v": run.laplace.v.cpu()},
        "generator": run.generator.get_state(),
    }
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(run: "EMRun", path: str | os.PathLike, rule: Any, acc: "Accelerator") -> "Point":
    """Restore ``run``, the stopping ``rule`` and the accelerator ``acc`` from ``path``; returns the current point.

    Raises
    ------
    ValueError
        Not a checkpoint, or one of a fit with other data, options, parameters or dtype.
    """
    from .accelerators import Point
    from .convergence import FixedPointGap
    from .groups import group_from_state

    path = os.fspath(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{path} is not a torchem checkpoint that can be loaded safely ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise ValueError(f"{path} is not a torchem checkpoint (format {FORMAT!r} version {VERSION})")
    meta = json.loads(payload["meta"])
    mine = _fingerprint(run)
    if meta["data"] != mine["data"]:
        raise ValueError(f"cannot resume from {path}: it was written by a fit of other data (the data hash differs)")
    for key in ("params", "dtype"):
        if meta[key] != mine[key]:
            raise ValueError(f"cannot resume from {path}: it has {key} {meta[key]!r}, this fit {mine[key]!r}")
    if meta["options"] != mine["options"]:
        diff = sorted(k for k in set(meta["options"]) | set(mine["options"])
                      if meta["options"].get(k) != mine["options"].get(k))
        raise ValueError(f"cannot resume from {path}: options differ ({', '.join(diff)}); resume with the "
                         "options of the interrupted fit")
    dev, dt = run.device, run.dtype

    def group(name):
        s = payload["groups"][name]
        return group_from_state({"family": s["family"], "config": json.loads(s["config"]), "hyper": s["hyper"]},
                                device=dev, dtype=dt)

    def post(name):
        return PosteriorMoments(**{k: v.to(dev) for k, v in payload[name].items()})

    e = payload["estep"]
    lap = run.laplace
    lap.x, lap.has_lik = e["x"].to(dev), e["has_lik"].to(dev)
    lap.lik = (e["nll"].to(dev), e["grad"].to(dev), e["hess"].to(dev))
    lap.v = e["v"].to(dev)
    run.generator.set_state(payload["generator"])
    lap.restart_seed = meta["restart_seed"]
    run.rows, run.warnings = meta["rows"], meta["warnings"]
    run._probed = {int(k): v for k, v in meta["probed"].items()}
    run._mstep_ok, run.converged = meta["mstep_ok"], meta["converged"]
    for k, v in meta["rule"].items():
        setattr(rule, k, v)
    run.last = (post("last_post"), group("last_group"), group("last_prior"))
    run._previous = group("previous") if "previous" in payload["groups"] else None
    run.gap = None if meta["gap"] is None else FixedPointGap(**meta["gap"])
    acc.load_state_dict(payload["accelerator"], device=dev)
    return Point(group("a"), post("post_a"), group("b"))
