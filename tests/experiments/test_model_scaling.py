"""`lmlab experiment model-scaling --quick`: a power law fits, and its exponent is positive."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import lmlab
from lmlab.experiments.model_scaling import T975, fit_power_law, t_quantile_975


def test_fit_power_law_recovers_an_exact_law_and_covers_a_noisy_one():
    sizes = [1e3, 3e3, 1e4, 3e4, 1e5]
    exact = fit_power_law(sizes, [5.0 * n**-0.2 for n in sizes])
    assert exact["alpha"] == pytest.approx(0.2) and exact["a"] == pytest.approx(5.0)
    assert exact["r2"] == pytest.approx(1.0) and exact["stderr"] == pytest.approx(0, abs=1e-9)
    noise = [1.03, 0.97, 1.02, 0.99, 1.01]
    noisy = fit_power_law(sizes, [5.0 * n**-0.2 * e for n, e in zip(sizes, noise, strict=True)])
    lo, hi = noisy["alpha_ci95"]
    assert lo < 0.2 < hi and 0.9 < noisy["r2"] < 1
    assert hi - noisy["alpha"] == pytest.approx(3.182 * noisy["stderr"])  # t, 3 dof


def test_t_quantiles_match_the_t_distribution():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(3) == 3.182
    assert t_quantile_975(31) == pytest.approx(2.040, abs=1e-3)
    assert t_quantile_975(1000) == pytest.approx(1.962, abs=1e-3)
    stats = pytest.importorskip("scipy.stats")
    for dof in [*range(1, len(T975) + 1), 31, 40, 60, 120, 500]:
        assert t_quantile_975(dof) == pytest.approx(stats.t.ppf(0.975, dof), abs=1e-3)


@pytest.mark.slow
def test_model_scaling_loss_falls_as_a_power_of_size(tmp_path: Path):
    result = lmlab.run_experiment("model-scaling", tmp_path / "ms", quick=True, log=lambda *a: None)
    fit, points = result.results["fit"], result.results["points"]
    assert len(points) == 5 and result.results["count"] == "non-embedding"
    assert [p["params"] for p in points] == sorted(p["params"] for p in points)
    assert all(p["params"] == p["non_embedding_params"] < p["total_params"] for p in points)
    assert points[0]["val_loss"] > points[-1]["val_loss"] + 0.2  # 10x the size, lower loss
    assert fit["alpha"] > 0.02  # the log-log slope is negative
    lo, hi = fit["alpha_ci95"]
    assert math.isfinite(lo) and math.isfinite(hi) and 0 < lo < fit["alpha"] < hi
    assert fit["r2"] >= 0.85
    assert all(p["tokens_per_param"] > 0 for p in points)
    assert set(result.results["bend"]) == {"alpha_smaller", "alpha_larger", "points_each"}
    chinchilla = result.results["chinchilla"]
    assert chinchilla["alpha"] == 0.34 and chinchilla["effective_alpha"] > 0
    assert all(p["chinchilla_loss"] > p["val_loss"] for p in points)  # BPE, far off its range
    saved = json.loads((tmp_path / "ms" / "results.json").read_text())
    assert saved["results"]["fit"] == json.loads(json.dumps(fit))
    readme = (tmp_path / "ms" / "README.md").read_text()
    assert f"alpha = {fit['alpha']:.3f}, 95% interval {lo:.3f} to {hi:.3f}" in readme
    assert "(fit.png)" in readme and "(chinchilla.png)" in readme
    for plot in result.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
