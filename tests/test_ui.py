"""The MLflow UI as a user sees it, in headless Chromium (skipped where no browser is installed):
the runs page opens on the runs (not the GenAI overview), nests the fine-tune under its parent,
draws the loss curve, and lists the exported models. See tests/ui_check.py."""

from __future__ import annotations

import pytest

from tests.ui_check import browser_available, check, make_runs

missing = browser_available()


@pytest.mark.slow
@pytest.mark.skipif(missing is not None, reason=f"UI check: {missing}")
def test_the_mlflow_ui_shows_runs_charts_and_models(tmp_path):
    runs = make_runs(tmp_path / "work")
    failures = check(runs, tmp_path / "shots")
    assert failures == []
    for name in ("runs.png", "charts.png", "models.png"):
        assert (tmp_path / "shots" / name).stat().st_size > 10_000
