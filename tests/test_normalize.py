"""Per-tensor standardisation over a zoo: statistics, bit-exact inversion, saving."""

import pytest
import torch

from vitzoo.tokenizer.normalize import Normalizer
from vitzoo.zoo_builder import Zoo


@pytest.fixture(scope="module")
def checkpoints():
    zoo = Zoo.open("bundled").filter(stage="finetune", head="linear", epoch="last")
    return [entry.state_dict() for entry in list(zoo)[:30]]


def test_per_tensor_statistics_standardise_the_zoo(checkpoints):
    normalizer = Normalizer.fit(checkpoints)
    assert normalizer.checkpoints == 30
    stacked = {k: torch.stack([normalizer.normalize(sd)[k] for sd in checkpoints]) for k in checkpoints[0]}
    for key, values in stacked.items():
        assert abs(values.mean().item()) < 1e-9, key
        if values.numel() > 1 and normalizer.std[key] > 1e-6:
            assert abs(values.std(unbiased=False).item() - 1) < 1e-6, key


def test_round_trip_is_bit_exact_for_float32(checkpoints):
    normalizer = Normalizer.fit(checkpoints)
    for state_dict in checkpoints[:5]:
        back = normalizer.denormalize(normalizer.normalize(state_dict))
        for key, value in state_dict.items():
            assert back[key].dtype == torch.float32 and torch.equal(back[key], value), key
    random = {k: torch.randn_like(v) * 1e3 for k, v in checkpoints[0].items()}  # far from the statistics
    back = normalizer.denormalize(normalizer.normalize(random))
    assert all(torch.equal(back[k], random[k]) for k in random)


def test_raw_mode_and_saving(tmp_path, checkpoints):
    raw = Normalizer.fit(checkpoints, mode="raw")
    assert torch.equal(raw.denormalize(raw.normalize(checkpoints[0]))["head.weight"], checkpoints[0]["head.weight"])
    fitted = Normalizer.fit(checkpoints)
    fitted.save(tmp_path / "normalizer.json")
    assert Normalizer.load(tmp_path / "normalizer.json") == fitted
    with pytest.raises(KeyError, match="other.weight"):
        fitted.normalize({"other.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="mode"):
        Normalizer.fit(checkpoints, mode="per_layer")
