"""Weight datasets (vitzoo.data): the three forms on the bundled zoo, lazy reads, labels as tensors, DataLoader
batches with workers, the flat round trip, cheap pickling and the errors."""

import math
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

import vitzoo.data
from vitzoo.data import WeightDataError, WeightDataset, _factor_table
from vitzoo.errors import ConfigError, VitzooError
from vitzoo.tokenizer import TokenSpec, detokenize
from vitzoo.zoo_builder import Zoo


@pytest.fixture(scope="module")
def zoo():
    return Zoo.open("bundled")


@pytest.fixture(scope="module")
def linear(zoo):
    return zoo.filter(stage="finetune", epoch="last", head="linear")  # 120 models of one shape


def assert_same_state_dict(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in b:
        assert torch.equal(a[key], b[key]), key


def test_state_dict_items_read_their_checkpoint_when_asked(zoo, monkeypatch):
    reads = []
    original = vitzoo.data.read_checkpoint
    monkeypatch.setattr(vitzoo.data, "read_checkpoint", lambda *args: reads.append(args[1]) or original(*args))
    dataset = WeightDataset(zoo)  # all 650 checkpoints, three head shapes: fine as state dicts
    assert len(dataset) == 650 and reads == []  # shapes come from the architecture, not from the files
    item = dataset[400]
    assert reads == [zoo[400].model_id]
    assert_same_state_dict(item["weights"], zoo[400].state_dict())
    assert item["model_id"] == zoo[400].model_id and item["epoch"] == zoo[400].epoch and item["index"] == 400
    with pytest.raises(WeightDataError, match="several shapes"):
        dataset.unflatten(torch.zeros(11_674))


def test_factors_and_metrics_are_tensors_with_a_vocabulary(zoo, linear):
    dataset = WeightDataset(linear, form="flat")
    entry, item = linear[7], dataset[7]
    factors, metrics = item["factors"], item["metrics"]
    assert factors["lr"].dtype == torch.float32 and factors["lr"].item() == pytest.approx(entry.factors["lr"])
    assert factors["seed"].dtype == torch.int64 and factors["seed"].item() == entry.factors["seed"]
    assert dataset.vocabulary["optimizer"] == ("adamw", "sgd") and dataset.vocabulary["head"] == ("linear",)
    assert dataset.vocabulary["optimizer"][factors["optimizer"]] == entry.factors["optimizer"]
    assert set(metrics) == {"train_acc", "train_loss", "val_acc", "val_loss", "test_acc", "test_loss"}
    assert metrics["val_acc"].item() == pytest.approx(entry.metrics["val_acc"])
    assert metrics["test_acc"].dtype == torch.float32 and metrics["test_acc"].shape == ()
    both = WeightDataset(zoo.filter(stage="finetune", epoch="last"))  # both heads: head is a two-word vocabulary
    assert both.vocabulary["head"] == ("linear", "mlp") and set(both.factors["head"].tolist()) == {0, 1}


def test_factor_table_numbers_missing_values_and_categories():
    table, vocabulary = _factor_table(
        [
            {"seed": 1, "lr": 1e-3, "subset": None, "opt": "sgd", "flag": True, "classes": [1, 2]},
            {"seed": 2, "lr": 1, "subset": 256, "opt": "adamw", "flag": False},  # no "classes": None
        ]
    )
    assert table["seed"].dtype == torch.int64 and table["seed"].tolist() == [1, 2]
    assert table["lr"].dtype == torch.float32 and table["lr"].tolist() == pytest.approx([1e-3, 1.0])
    assert math.isnan(table["subset"][0]) and table["subset"][1] == 256  # a number where present, NaN where None
    assert vocabulary["opt"] == ("adamw", "sgd") and table["opt"].tolist() == [1, 0]
    assert vocabulary["flag"] == (False, True) and table["flag"].tolist() == [1, 0]  # bools are categories
    assert vocabulary["classes"] == ([1, 2], None) and table["classes"].tolist() == [0, 1]


def test_flat_vectors_round_trip_to_the_same_state_dict(linear):
    dataset = WeightDataset(linear, form="flat")
    vector = dataset[3]["weights"]
    assert vector.shape == (dataset.num_params,) == (11_674,) and vector.dtype == torch.float32
    back = dataset.unflatten(vector)
    original = linear[3].state_dict()
    assert list(back) == dataset.keys and set(back) == set(original)
    assert_same_state_dict(back, original)
    assert torch.equal(dataset.flatten(back), vector)
    batch = dataset.unflatten(torch.stack([vector, dataset[4]["weights"]]))  # [2, P] -> tensors [2, ...]
    assert batch["head.weight"].shape == (2, *original["head.weight"].shape)
    assert torch.equal(batch["head.weight"][1], linear[4].state_dict()["head.weight"])
    linear[3].model().load_state_dict(back, strict=True)  # the model's own keys and shapes


def test_tokens_form_detokenizes_to_the_checkpoint(linear):
    dataset = WeightDataset(linear, form="tokens", width=25)
    values = dataset[0]["weights"]
    assert values.shape == (dataset.spec.num_tokens, 25)
    assert_same_state_dict(detokenize(values, dataset.spec), linear[0].state_dict())
    same = TokenSpec.from_state_dict(linear[0].state_dict(), width=25, num_heads=2)
    assert dataset.spec == same
    assert torch.equal(WeightDataset(linear, form="tokens", spec=same)[0]["weights"], values)


def test_default_dataloader_batches_every_form_with_two_workers(linear):
    dataset = WeightDataset(linear, form="flat")
    loader = DataLoader(dataset, batch_size=8, num_workers=2)
    batches = list(loader)
    assert len(batches) == 15
    batch = batches[1]
    assert batch["weights"].shape == (8, 11_674) and batch["index"].tolist() == list(range(8, 16))
    assert batch["factors"]["lr"].shape == (8,) and batch["factors"]["optimizer"].dtype == torch.int64
    assert batch["metrics"]["val_acc"].shape == (8,) and batch["model_id"] == [e.model_id for e in linear][8:16]
    assert torch.equal(batch["weights"][2], dataset[10]["weights"])
    for form, key, shape in (("state_dict", "head.weight", (4, 10, 24)), ("tokens", None, (4, 940, 16))):
        first = next(iter(DataLoader(WeightDataset(linear, form=form), batch_size=4, num_workers=2)))
        assert (first["weights"][key] if key else first["weights"]).shape == shape


def test_pickles_without_weights(linear):
    dataset = WeightDataset(linear, form="tokens")
    data = pickle.dumps(dataset)
    assert len(data) < 1_000 * len(dataset)  # a checkpoint holds 47 kB of weights
    again = pickle.loads(data)
    assert torch.equal(again[5]["weights"], dataset[5]["weights"])


def test_errors_are_clear(zoo, linear):
    with pytest.raises(WeightDataError, match="selection is empty"):
        WeightDataset(zoo.filter(stage="finetune", epoch=99))
    with pytest.raises(ConfigError, match="unknown form 'vector'"):
        WeightDataset(linear, form="vector")
    for form in ("flat", "tokens"):
        with pytest.raises(WeightDataError, match=r"mixes 2 .*mlp head \(16 hidden\).*filter\(head='linear'\)"):
            WeightDataset(zoo.filter(stage="finetune", epoch="last"), form=form)
    with pytest.raises(ConfigError, match="token spec is for form='tokens'"):
        WeightDataset(linear, form="flat", spec=TokenSpec.from_state_dict(linear[0].state_dict(), 16, 2))
    dataset = WeightDataset(linear, form="flat")
    with pytest.raises(WeightDataError, match="11674 values"):
        dataset.unflatten(torch.zeros(5))
    with pytest.raises(WeightDataError, match="missing"):
        dataset.flatten({"cls_token": torch.zeros(1, 1, 24)})
    assert issubclass(WeightDataError, VitzooError)
