"""Zoo models exported as timm / Hugging Face folders load in timm with the zoo model's outputs and preprocessing."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import REPO, run_cli
from timm.data import resolve_data_config

from vitzoo.cli import main
from vitzoo.errors import ConfigError
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.data import info
from vitzoo.zoo_builder.export import ExportError, export
from vitzoo.zoo_builder.zoo import write_sampled

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def last():
    return Zoo.open("bundled").filter(epoch="last")


def first(zoo, stage: str, head: str):
    return next(e for e in zoo if e.stage == stage and e.head["head"] == head)


def assert_same_outputs(model, reference, channels: int = 1, size: int = 28) -> None:
    images = torch.randn(8, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(images), model(images)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "stage, head, architecture",
    [("finetune", "linear", "vit_small_patch16_224"), ("finetune", "mlp", "vitzoo_vit_mlp_head"),
     ("pretrain", "linear", "vit_small_patch16_224")],
)  # fmt: skip
def test_timm_loads_export_with_zoo_outputs_and_preprocessing(tmp_path, last, stage, head, architecture):
    entry = first(last, stage, head)
    (folder,) = export("bundled", tmp_path / "out", [entry.model_id])
    assert folder == tmp_path / "out" / entry.model_id
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == architecture and config["num_classes"] == entry.head["num_classes"]
    assert config["vitzoo"]["checkpoint_sha256"] == entry.sha256

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert_same_outputs(model, entry.model())
    dataset = info(entry.factors["dataset"])  # digits for fine-tunes, Fashion-MNIST for parents
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (1, 28, 28)
    assert data["mean"] == pytest.approx(dataset.mean) and data["std"] == pytest.approx(dataset.std)
    assert (data["interpolation"], data["crop_pct"], data["crop_mode"]) == ("bilinear", 1.0, "center")
    assert model.pretrained_cfg["num_classes"] == model.num_classes == entry.head["num_classes"]


def test_mlp_export_adapts_like_a_timm_classifier(tmp_path, last):
    entry = first(last, "finetune", "mlp")
    (folder,) = export("bundled", tmp_path / "out", [entry.model_id])
    five = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=5)  # a new last layer, head.2
    torch.testing.assert_close(five.head[0].weight, entry.state_dict()["head.0.weight"], rtol=0, atol=0)
    assert five.head[2].out_features == 5
    with pytest.raises(ConfigError, match="no pretrained weights of its own"):
        timm.create_model("vitzoo_vit_mlp_head", pretrained=True)


def test_sampled_zoo_exports_with_its_dataset(tmp_path, last):
    entry = first(last, "finetune", "mlp")
    zoo = Zoo.open("bundled")
    samples = [(entry.state_dict(), {"method": "copy"}, entry.head)]
    sampled = write_sampled(tmp_path / "samples", zoo.architecture, zoo.dataset, samples)
    (folder,) = export(tmp_path / "samples", tmp_path / "out")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert_same_outputs(model, sampled[0].model())
    assert resolve_data_config({}, model=model)["mean"] == pytest.approx(info("digits").mean)


def test_export_refuses_unknown_ids_and_used_folders(tmp_path, last):
    entry = first(last, "finetune", "linear")
    with pytest.raises(ExportError, match="unknown model id.*ft-nobody"):
        export("bundled", tmp_path / "out", [entry.model_id, "ft-nobody"])
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # nothing written, no staging left
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export("bundled", tmp_path / "used", [entry.model_id])
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "args, message",
    [(["bundled", "outt=x"], "unknown option outt="), (["bundled", "overwrite=yes"], "expected true or false"),
     (["bundled", "ft-nobody"], "unknown model id(s) ft-nobody")],
)  # fmt: skip
def test_cli_export_bad_input_is_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *args, f"out={tmp_path / 'out'}"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_export_writes_folders_for_plain_timm_and_refuses_to_overwrite(tmp_path, capsys, last):
    linear, mlp = first(last, "finetune", "linear"), first(last, "finetune", "mlp")
    out = tmp_path / "export"
    result = run_cli("export", "bundled", linear.model_id, mlp.model_id, f"out={out}")
    assert "2 models exported" in result.stdout
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["zoo"] == "bundled" and manifest["models"] == [linear.model_id, mlp.model_id]

    # in a Python without vitzoo: the linear head is plain timm, the MLP head needs vitzoo's registration
    script = (
        "import sys, timm\n"
        f"timm.create_model('local-dir:{out / linear.model_id}', pretrained=True)\n"
        "try:\n"
        f"    timm.create_model('local-dir:{out / mlp.model_id}', pretrained=True)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
        "print('vitzoo' in sys.modules)\n"
    )
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split("\n")[:2] == ["Unknown model (vitzoo_vit_mlp_head)", "False"]

    with pytest.raises(SystemExit):
        main(["export", "bundled", linear.model_id, f"out={out}"])  # out holds an export
    assert "pass overwrite=true to replace it" in capsys.readouterr().err
    main(["export", "bundled", mlp.model_id, f"out={out}", "overwrite=true"])
    assert sorted(p.name for p in out.iterdir()) == ["export.json", mlp.model_id]
