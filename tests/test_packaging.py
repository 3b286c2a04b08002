"""The wheel: everything under `vitzoo.*`, with the configs, the bundled zoo and the shipped generator inside, and
usable from a folder that holds a `configs/` of its own."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy: building writes build/ and *.egg-info/ beside the sources
    local = {".venv", ".git", "build", "runs", "zoos", "vitzoo.egg-info"}  # this checkout's own, at its top level
    shutil.copytree(REPO, source, ignore=lambda folder, names: local & set(names) if Path(folder) == REPO else set())
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (path,) = out.glob("vitzoo-*.whl")
    return path


def test_wheel_holds_one_namespace_and_its_package_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"vitzoo", wheel.name.split("-py3")[0] + ".dist-info"}
    for package in ("zoo_builder", "tokenizer", "generative", "eval", "configs"):
        assert f"vitzoo/{package}/__init__.py" in names
    configs = [n for n in names if n.startswith("vitzoo/configs/") and n.endswith(".yaml")]
    assert len(configs) == len(list((REPO / "configs").rglob("*.yaml")))
    bundled = REPO / "zoo_builder" / "bundled"
    for folder in ("checkpoints", "runs"):
        shipped = [n for n in names if n.startswith(f"vitzoo/zoo_builder/bundled/{folder}/")]
        assert len(shipped) == sum(1 for p in (bundled / folder).rglob("*") if p.is_file())
    assert {"vitzoo/zoo_builder/bundled/zoo.json", "vitzoo/zoo_builder/bundled/index.jsonl",
            "vitzoo/generative/bundled/generator.safetensors", "vitzoo/generative/bundled/autoencoder.safetensors",
            "vitzoo/generative/bundled/latent_diffusion.safetensors"} <= set(names)  # fmt: skip
    assert not any(n.startswith(("vitzoo/tests/", "vitzoo/benchmarks/")) for n in names)


def test_installed_wheel_works_beside_a_foreign_configs_folder(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)  # a Hydra project's own configs must not shadow vitzoo's
    (work / "configs" / "sample.yaml").write_text("not: vitzoo\n")
    script = (
        "import vitzoo, vitzoo.cli; from vitzoo.zoo_builder import Zoo; "
        "print(vitzoo.__file__); print(len(Zoo.open('bundled'))); print(vitzoo.cli.CONFIG_DIR)"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    module, models, config_dir = result.stdout.split()
    assert module.startswith(str(site)) and models == "650" and config_dir.startswith(str(site))
    help_text = subprocess.run([sys.executable, "-m", "vitzoo.cli", "sample", "bundled", "--help"], cwd=work,
                               env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert help_text.returncode == 0 and "target_acc" in help_text.stdout, help_text.stderr[-2000:]


def imported_modules(folder: Path) -> set[str]:
    """Every module named by an import statement in the package's files (top level and inside functions)."""
    import ast

    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
    return names


def test_packages_import_only_downwards():
    """zoo_builder <- tokenizer <- generative, eval <- the CLI: generative and eval never import each other."""
    order = {"zoo_builder": 0, "tokenizer": 1, "generative": 2, "eval": 2}
    for package, level in order.items():
        for name in imported_modules(REPO / package):
            parts = name.split(".")
            if parts[0] == "vitzoo" and len(parts) > 1 and parts[1] in order:
                other = parts[1]
                assert other == package or order[other] < level, f"{package} imports {name}"
            assert not (parts[0] == "vitzoo" and len(parts) > 1 and parts[1] in ("cli", "demo", "conditioning")), name


@pytest.mark.slow
def test_demo_from_the_installed_wheel_in_an_empty_folder_gives_the_checkouts_table(wheel, tmp_path):
    """The demo from the wheel (installed apart, run from an empty folder) and from the checkout: the same table."""
    import json

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    tables = []
    for name, env in (("wheel", {"PYTHONPATH": str(site)}), ("checkout", {})):  # the checkout: the editable install
        work = tmp_path / name
        work.mkdir()
        command = [sys.executable, "-m", "vitzoo.cli", "demo", "out=demo", "threads=2"]
        result = subprocess.run(command, cwd=work, env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled", **env},
                                capture_output=True, text=True, timeout=1200)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        rows = json.loads((work / "demo" / "results.json").read_text())["rows"]
        tables.append([{k: v for k, v in row.items() if k != "seconds"} for row in rows])
    assert tables[0] == tables[1] and len(tables[0]) >= 10
