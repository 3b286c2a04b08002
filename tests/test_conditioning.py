"""The conditioning report: Spearman correlations and per-factor orderings computed from its own rows."""

import json

import pytest
from scipy.stats import spearmanr

from vitzoo.conditioning import conditioning, write_conditioning
from vitzoo.zoo_builder.zoo import ZooError


def test_conditioning_report_is_consistent_with_its_rows(tmp_path):
    result = conditioning("bundled", targets=[0.3, 0.6, 0.9], per_target=3, per_slot=2, seed=1, pool=30)
    rows = result["targets"]
    assert len(rows) == 9 and {r["target"] for r in rows} == {0.3, 0.6, 0.9}
    expected = spearmanr([r["target"] for r in rows], [r["achieved"] for r in rows]).statistic
    assert abs(result["target_spearman"] - expected) < 1e-12
    picked = result["reference_targets"]  # measure-and-pick at the same targets, the non-learned reference
    assert len(picked) == 9 and result["pool"] == 30
    expected = spearmanr([r["target"] for r in picked], [r["achieved"] for r in picked]).statistic
    assert abs(result["reference_target_spearman"] - expected) < 1e-12
    assert len(result["slots"]) == 6 and all(0 <= r["samples_mean"] <= 1 for r in result["slots"])
    optimizers = {r["value"]: r for r in result["factors"] if r["factor"] == "optimizer"}
    adamw = [r["samples_mean"] for r in result["slots"] if r["optimizer"] == "adamw"]
    assert abs(optimizers["adamw"]["samples_mean"] - sum(adamw) / 3) < 1e-12
    out = write_conditioning(result, tmp_path / "conditioning")
    assert json.loads((out / "results.json").read_text())["generator_sha256"] == result["generator_sha256"]
    assert (out / "conditioning.png").stat().st_size > 0 and "Spearman" in (out / "report.md").read_text()


def test_conditioning_of_the_latent_diffusion_beside_measure_and_pick(tmp_path):
    from vitzoo.generative.latent import BUNDLED_LATENT_DIFFUSION, TEMPERATURE

    result = conditioning(str(BUNDLED_LATENT_DIFFUSION), targets=[0.3, 0.9], per_target=2, per_slot=1, pool=20)
    assert result["method"] == "latent diffusion" and len(result["targets"]) == 4
    assert result["temperature"] == TEMPERATURE < 1  # recorded: the latent diffusion's own default, not DDIM's 1
    assert len(result["reference_targets"]) == 4 and len(result["slots"]) == 6  # pick from the shipped family basis
    out = write_conditioning(result, tmp_path / "conditioning")
    assert "latent diffusion: achieved mean" in (out / "report.md").read_text()


def test_conditioning_refuses_a_temperature_for_the_family_diffusion():
    with pytest.raises(ZooError, match="latent diffusion only"):
        conditioning("bundled", temperature=0.7)
