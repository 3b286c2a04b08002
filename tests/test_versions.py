"""Library versions recorded by every writer (zoo.json, run records, generative checkpoints); artefacts written
before they were recorded still load."""

import json
from importlib.metadata import version

from safetensors.torch import save

from vitzoo.generative.checkpoint import read_checkpoint, write_checkpoint
from vitzoo.generative.generator import BUNDLED_GENERATOR, load_generator
from vitzoo.generative.hyper import BUNDLED_AUTOENCODER, load_autoencoder
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.zoo import library_versions, write_sampled


def test_library_versions_name_torch_timm_and_diffusers():
    assert library_versions() == {name: version(name) for name in ("torch", "timm", "diffusers")}


def test_a_sampled_folder_records_the_versions(tmp_path):
    bundled = Zoo.open("bundled")
    entry = bundled.filter(stage="finetune", epoch="last")[0]
    zoo = write_sampled(tmp_path / "sampled", bundled.architecture, "digits",
                        [(entry.state_dict(), {"method": "copy"}, entry.head)])  # fmt: skip
    meta = json.loads((zoo.root / "zoo.json").read_text())
    assert meta["versions"] == library_versions() and meta["created_by"].startswith("vitzoo")
    assert zoo.records["sample-00000"]["versions"] == library_versions()


def test_a_generative_checkpoint_records_the_versions(tmp_path):
    weights, metadata = read_checkpoint(BUNDLED_GENERATOR)
    write_checkpoint(tmp_path / "generator.safetensors", weights, metadata)
    assert read_checkpoint(tmp_path / "generator.safetensors")[1]["versions"] == library_versions()
    load_generator(tmp_path / "generator.safetensors")  # loaders accept the field
    write_checkpoint(tmp_path / "rewritten.safetensors", weights, {**metadata, "versions": {"torch": "2.4.0"}})
    assert read_checkpoint(tmp_path / "rewritten.safetensors")[1]["versions"] == {"torch": "2.4.0"}  # kept as given


def test_artefacts_without_versions_still_load(tmp_path):
    zoo = Zoo.open("bundled")
    assert "versions" not in zoo.meta and "versions" not in next(iter(zoo.records.values()))
    assert "versions" not in read_checkpoint(BUNDLED_GENERATOR)[1]  # written before versions were recorded
    load_generator(BUNDLED_GENERATOR)
    weights, metadata = read_checkpoint(BUNDLED_AUTOENCODER)  # retrained since: rewrite it as an older one was
    del metadata["versions"]
    old = tmp_path / "autoencoder.safetensors"
    old.write_bytes(save({k: v.contiguous() for k, v in weights.items()}, {"vitzoo": json.dumps(metadata)}))
    assert "versions" not in read_checkpoint(old)[1]
    load_autoencoder(old)
