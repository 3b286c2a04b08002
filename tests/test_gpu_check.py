"""benchmarks/gpu_check.sh, the unattended GPU checks, run end to end on the CPU at tiny sizes."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_runs_on_the_cpu_and_writes_every_number(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["failures"] == {} and report["device"] == "cpu" and report["tiny"]
    training = report["training"]
    for mode in ("loop", "vmap"):
        assert training[mode]["images_per_s"] > 0 and training[mode]["model_steps_per_s"] > 0
    assert training["ratio"] > 0 and training["precision"] == "fp32"
    evaluation = report["evaluation"]
    assert evaluation["vmap"]["models_per_s"] > 0 and evaluation["ratio"] > 0
    assert evaluation["max_accuracy_difference"] <= 0.01
    decoding = report["decoding"]
    assert decoding["cpu_pillow_images_per_s"] > 0 and decoding["device_images_per_s"] > 0
    assert decoding["pixel_mean_abs_difference"] == 0  # on the CPU both decode with Pillow
    rows = decoding["population"]["rows"]
    assert [row["models"] for row in rows] == [1, 4]
    for row in rows:
        assert row["pooled"] > 0 and row["baseline"] > 0 and 0 <= row["pooled_wait"] <= 1 and row["ratio"] > 0


def test_a_failing_check_is_recorded_and_fails_the_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "meta", "--tiny", "--out", str(out),
                           "--only", "training"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    report = json.loads(out.read_text())
    assert not report["ok"] and set(report["failures"]) == {"training"}
