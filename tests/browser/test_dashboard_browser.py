"""The dashboard in a real browser, served as the README says: ``torchem dashboard data.csv`` (Voila).

Headless Chromium loads the app, the Data tab has mapped the CSV, Fit runs the
fit, and the results are checked where a user reads them.  Needs Voila and
Playwright for Python (the dev extra) and Debian's Chromium (``apt-get install
chromium``, at /usr/bin/chromium or $TORCHEM_CHROMIUM); Playwright drives that
binary and never downloads a browser.

The test writes its screenshot under pytest's temporary folder, never into the
repository.  ``python tests/browser/test_dashboard_browser.py`` runs the same
session and updates ``docs/dashboard.png`` (the README's picture).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("TORCHEM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
N_SUBJECTS = 20


def write_data(path: Path) -> None:
    """A long CSV of simulated rw1a1b subjects: participant, block, trial, choice 'A'/'B', reward."""
    from torchem import norm2alpha, norm2beta
    from torchem.models.rl import rw1a1b_simulate

    rng = np.random.default_rng(0)
    true = np.column_stack([norm2beta(rng.standard_normal(N_SUBJECTS)), norm2alpha(rng.standard_normal(N_SUBJECTS))])
    sim = rw1a1b_simulate(true, nblocks=2, ntrials=24, seed=1)
    rows = [{"participant": f"P{i + 1:02d}", "block": b + 1, "trial": t + 1, "choice": "AB"[sim["choices"][i, b, t]],
             "reward": sim["rewards"][i, b, t]} for i in range(N_SUBJECTS) for b in range(2) for t in range(24)]
    pd.DataFrame(rows).to_csv(path, index=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard server exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:  # a TCP probe: an HTTP request for the page would start a kernel of its own
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"the dashboard server did not listen on {host}:{port} within {timeout:.0f} s")


@contextmanager
def dashboard_server(workdir: Path):
    """``torchem dashboard <workdir>/data.csv`` on a free port; yields the URL."""
    data = workdir / "data.csv"
    write_data(data)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torchem.cli", "dashboard", str(data), f"--port={port}",
                                 "--no-browser"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_listening("127.0.0.1", port, proc, 90, log_path)
            yield f"http://127.0.0.1:{port}/"
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def fit_in_browser(url: str, screenshot: Path) -> list[str]:
    """Load the app, fit, check what the user reads, save a screenshot; returns the page's script errors."""
    from playwright import sync_api

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url, timeout=90_000)
            # Voila runs the notebook, then the widgets render; the Data tab has mapped and checked the CSV
            fit = page.locator(".torchem-dashboard button:text-is('Fit')")
            fit.wait_for(state="visible", timeout=120_000)
            page.get_by_text(f"data: {N_SUBJECTS} subjects").wait_for(timeout=20_000)
            fit.click()
            # the fit runs in the kernel's background thread; the page stays live and the bar fills up
            page.get_by_text("Fit finished").wait_for(timeout=120_000)
            page.wait_for_function(
                """() => { const b = document.querySelector('.torchem-progress .progress-bar');
                           return b !== null && b.style.width === '100%'; }""", timeout=10_000)
            table = page.locator("table.torchem-results")
            table.wait_for(state="visible", timeout=20_000)
            assert table.locator("tbody tr").count() == N_SUBJECTS
            assert table.locator("thead").inner_text().split()[:2] == ["beta", "alpha"]
            text = page.locator(".torchem-dashboard").inner_text()
            assert "LME (Laplace)" in text and "mu (natural)" in text
            link = page.locator("a.torchem-download")
            assert link.is_visible() and link.get_attribute("href").startswith("data:text/csv;base64,")
            page.locator(".torchem-dashboard img:visible").first.wait_for(state="visible", timeout=10_000)
            assert page.locator(".torchem-error").count() == 0
            # in a narrow window the table scrolls inside its box instead of running off the page
            page.set_viewport_size({"width": 420, "height": 1300})
            time.sleep(0.3)
            box = page.evaluate("""() => { const t = document.querySelector('table.torchem-results');
                                           let b = t.parentElement;
                                           while (b && getComputedStyle(b).overflowX !== 'auto') b = b.parentElement;
                                           const r = b.getBoundingClientRect();
                                           return {right: r.right, width: window.innerWidth, scroll: b.scrollWidth,
                                                   client: b.clientWidth, table: t.scrollWidth}; }""")
            assert box["right"] <= box["width"] + 1, box
            assert box["scroll"] >= box["table"] and box["client"] < box["table"], box
            page.set_viewport_size({"width": 1400, "height": 1300})
            time.sleep(0.5)  # let the last images paint
            page.locator(".torchem-dashboard").screenshot(path=str(screenshot))
            return errors
        finally:
            browser.close()


def test_dashboard_fits_in_the_browser(tmp_path):
    import pytest

    pytest.importorskip("voila", reason="Voila is not installed (pip install -e '.[dev]')")
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    tracked = (ROOT / "docs" / "dashboard.png").read_bytes() if (ROOT / "docs" / "dashboard.png").exists() else None
    shot = tmp_path / "dashboard.png"
    with dashboard_server(tmp_path) as url:
        errors = fit_in_browser(url, shot)
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    # the test run leaves the repository as it was
    now = (ROOT / "docs" / "dashboard.png").read_bytes() if (ROOT / "docs" / "dashboard.png").exists() else None
    assert now == tracked


if __name__ == "__main__":  # update the README's screenshot
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "dashboard.png"
        with dashboard_server(Path(tmp)) as url:
            problems = fit_in_browser(url, shot)
        if problems:
            sys.exit(f"script errors in the page: {problems}")
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")
        print(f"wrote {ROOT / 'docs' / 'dashboard.png'}")
