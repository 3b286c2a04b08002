"""The Python API (`vitzoo.<command>(**options)`) runs the CLI's commands with the same configs and policies."""

import subprocess
import sys

import pytest

import vitzoo
from vitzoo.errors import ConfigError


def test_importing_vitzoo_loads_no_torch():
    code = "import sys, vitzoo; assert 'torch' not in sys.modules; print(vitzoo.__all__)"
    assert "train" in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_train_sample_evaluate_from_python(tmp_path):
    checkpoint = vitzoo.train("bundled", model="transfer", model__probes=64, holdout_parents=["pt-2aa5c45043"],
                              out=tmp_path / "transfer")  # fmt: skip
    assert checkpoint == tmp_path / "transfer" / "transfer.safetensors" and checkpoint.exists()
    samples = vitzoo.sample(checkpoint, parent="pt-2aa5c45043", head_seed=42, n=2, out=tmp_path / "a b(1)")
    assert isinstance(samples, vitzoo.Zoo) and len(samples) == 2  # paths with spaces and parentheses pass through
    report = vitzoo.evaluate(samples.root, out=tmp_path / "eval")
    assert report.name == "report.md" and "sampled" in report.read_text()
    with pytest.raises(ConfigError, match="already holds"):  # nothing overwritten without overwrite=True
        vitzoo.train("bundled", model="transfer", out=tmp_path / "transfer")
    assert vitzoo.train("bundled", model="transfer", model__probes=64, out=tmp_path / "transfer", overwrite=True)
    with pytest.raises(ConfigError, match="bogus"):
        vitzoo.sample(checkpoint, bogus=1, out=tmp_path / "x")
