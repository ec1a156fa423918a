"""Start-up of a fresh process: what ``import torchem`` and the first fit load."""
from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import sys
import numpy as np
import torch
torch.set_num_threads(1)
import torchem
assert "matplotlib" not in sys.modules, "import torchem loaded matplotlib"
from torchem import EMModel
from torchem.models.rl import rw1a1b_fit, rw1a1b_simulate
rng = np.random.default_rng(0)
sim = rw1a1b_simulate(np.column_stack([rng.uniform(2, 12, 8), rng.uniform(0.1, 0.9, 8)]), nblocks=2, seed=0)
model = EMModel([[c, r] for c, r in zip(sim["choices"], sim["rewards"])], rw1a1b_fit, device="cpu")
res = model.fit(verbose=0, mstep_maxit=3)
assert res.hessian_ok.all()
loaded = [m for m in ("torch._dynamo", "matplotlib") if m in sys.modules]
print("LOADED", loaded)
"""


def test_first_fit_loads_neither_dynamo_nor_matplotlib():
    # torch.func's gradient transforms import torch._dynamo (1-3 s) and pyplot costs about a second:
    # a fit needs neither
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout, out.stdout
