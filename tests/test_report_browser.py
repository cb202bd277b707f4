"""The HTML report of the recorded Ray 2.12 fixture, opened in real headless Chromium: the
screenshot shows the plots (the red "shown by RLlib" and green "truth" lines are drawn).

Needs Debian's chromium (`.ci/run` installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from reward_audit import compare
from reward_audit.report import render_html

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "runs", "ray212_newstack_leak")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def color_share(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> float:
    pixels = (image[..., :3] * 255).astype(int)
    return float((np.abs(pixels - np.array(rgb)).sum(axis=-1) < tol).mean())


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`apt-get install chromium`); .ci/run installs it")
def test_html_report_of_the_2_12_fixture_shows_plots_in_chromium(tmp_path):
    import matplotlib.image

    audit = compare(FIXTURE)
    page = tmp_path / "report.html"
    page.write_text(render_html(audit))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,4000",
            f"--screenshot={shot}", f"file://{page}",
        ],
        check=True, capture_output=True, timeout=120,
    )
    image = matplotlib.image.imread(str(shot))
    assert image.shape[0] >= 4000 and image.shape[1] >= 1200
    # matplotlib's tab:red (shown by RLlib) and tab:green (truth) appear only in the plots.
    assert color_share(image, (214, 39, 40)) > 1e-4
    assert color_share(image, (44, 160, 44)) > 1e-4
    shutil.copy(shot, os.environ.get("REWARD_AUDIT_SCREENSHOT", str(tmp_path / "kept.png")))
