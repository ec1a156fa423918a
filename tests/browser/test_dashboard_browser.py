"""The dashboard in a real browser: Voila renders a small notebook, headless Chromium clicks Fit.

Needs Voila and Playwright for Python (the dev extra) and Debian's Chromium
(``apt-get install chromium``, at /usr/bin/chromium or $TORCHEM_CHROMIUM);
Playwright drives that binary and never downloads a browser.  The screenshot
is saved as a test artifact under pytest's tmp dir and copied to
docs/dashboard.png for the README.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("TORCHEM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
N_SUBJECTS = 20

NOTEBOOK_CELLS = [
    f"""\
import sys, importlib.util
import numpy as np, torch
torch.set_num_threads(1)
try:
    from torchem.widgets import FitDashboard
except ImportError:  # a bare checkout: load widgets/ as torchem.widgets
    root = {str(ROOT)!r}
    spec = importlib.util.spec_from_file_location("torchem.widgets", root + "/widgets/__init__.py",
                                                  submodule_search_locations=[root + "/widgets"])
    mod = importlib.util.module_from_spec(spec); sys.modules["torchem.widgets"] = mod; spec.loader.exec_module(mod)
    from torchem.widgets import FitDashboard
from torchem import norm2alpha, norm2beta
from torchem.models.rl import rw1a1b_simulate""",
    f"""\
rng = np.random.default_rng(0)
true_params = np.column_stack([norm2beta(rng.standard_normal({N_SUBJECTS})),
                               norm2alpha(rng.standard_normal({N_SUBJECTS}))])
sim = rw1a1b_simulate(true_params, nblocks=2, ntrials=24, seed=1)
all_data = [[c, r] for c, r in zip(sim["choices"], sim["rewards"])]
dash = FitDashboard(None, all_data, true_params={{"rw1a1b": true_params}}, ibic_nsamples=200)
dash.max_iter.value = 100
dash.conv_crit.value = 1e-2
dash""",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the Voila server exited with code {proc.returncode}")
        try:  # a TCP probe: an HTTP request for the page would start a kernel of its own
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"the Voila server did not listen on {host}:{port} within {timeout:.0f} s")


@pytest.fixture
def voila_url(tmp_path):
    pytest.importorskip("voila", reason="Voila is not installed (pip install -e '.[dev]')")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in NOTEBOOK_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "dashboard.ipynb")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = open(tmp_path / "voila.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "voila", "dashboard.ipynb", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
         "--VoilaConfiguration.show_tracebacks=True", "--ServerApp.open_browser=False"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_listening("127.0.0.1", port, proc, 60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_dashboard_fits_in_the_browser(voila_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(voila_url, timeout=60_000)
            # Voila runs the notebook, then the widgets render
            fit = page.locator(".torchem-dashboard button:text-is('Fit')")
            fit.wait_for(state="visible", timeout=90_000)
            page.get_by_text("data: 20 subjects").wait_for(timeout=10_000)
            fit.click()
            # the fit runs in the kernel's background thread; the page stays live and the bar fills up
            page.get_by_text("Fit finished").wait_for(timeout=90_000)
            page.wait_for_function(
                """() => { const b = document.querySelector('.torchem-progress .progress-bar');
                           return b !== null && b.style.width === '100%'; }""", timeout=10_000)
            table = page.locator("table.torchem-results")
            table.wait_for(state="visible", timeout=20_000)
            assert table.locator("tbody tr").count() == N_SUBJECTS
            assert page.locator("table.torchem-results thead").inner_text().split()[:2] == ["beta", "alpha"]
            assert "LME (Laplace)" in page.locator(".torchem-dashboard").inner_text()
            page.locator(".torchem-dashboard img:visible").first.wait_for(state="visible", timeout=10_000)
            assert page.locator(".torchem-error").count() == 0
            time.sleep(0.5)  # let the last images paint
            shot = tmp_path / "dashboard.png"
            page.locator(".torchem-dashboard").screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")
            docs = ROOT / "docs"
            docs.mkdir(exist_ok=True)
            shutil.copyfile(shot, docs / "dashboard.png")
            assert not errors, errors
        finally:
            browser.close()
