"""`vitzoo import vitmodelzoo`: fixtures in the official ViT Model Zoo layout, read back into the zoo format.

The fixtures are real timm `vit_small_patch16_224` state dicts: one full-size ViT-S/16 (22M parameters, two
checkpoints) and a tiny variant (dim 24, depth 2, 2 heads, 32px) with a linear-head and an MLP-head fine-tune.
"""

import json
import re
import shutil

import pytest
import timm
import torch
from torch import nn

from vitzoo.cli import main
from vitzoo.zoo_builder.importers import ImportErrorBadInput, import_vitmodelzoo

TINY = {"img_size": 32, "patch_size": 16, "embed_dim": 24, "depth": 2, "num_heads": 2}
PARENT = "sl_vit_tiny_seed_42"  # a pre-trained model's directory name, as fine-tuning configs refer to it


@pytest.fixture(autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vit(num_classes: int, head: str = "linear", hidden: int = 16, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=num_classes, **kwargs)
    if head == "mlp":  # the zoo's MLP head: vit.head.0 / vit.head.2
        model.head = nn.Sequential(nn.Linear(model.embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return model


def trajectory(model: nn.Module, epochs: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Distinct state dicts standing for the weights after each epoch."""
    base = model.state_dict()
    return {e: {k: v + 1e-3 * e * torch.randn_like(v) for k, v in base.items()} for e in epochs}


def results(epochs: int, ray: bool = True) -> list[dict]:
    """result.json lines: Ray Tune's (training_iteration 0 = the initial evaluation, plus bookkeeping keys), or
    plain per-epoch lines without an epoch key."""
    lines = []
    for i in range(epochs + 1 if ray else epochs):
        line = {"train_loss": 4.6 - 0.1 * i, "train_acc": 0.01 * i, "test_loss": 4.7 - 0.1 * i, "test_acc": 0.02 * i}
        if ray:
            line |= {
                "training_iteration": i,
                "timestamp": 1_700_000_000 + i,
                "time_this_iter_s": 1.5,
                "done": False,
                "trial_id": "abc12_00000",
                "config": {"optim::lr": 0.001},
            }
        lines.append(line)
    return lines


def write_model(directory, config: dict, checkpoints: dict[str, dict[str, torch.Tensor]], lines: list[dict]) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=4))
    (directory / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for name, state in checkpoints.items():
        (directory / name).mkdir()
        torch.save({f"vit.{k}": v for k, v in state.items()}, directory / name / "checkpoints")


def pretrain_config(**overrides) -> dict:
    return {
        "dataset::name": "ImageNet1K",
        "model::init_type": "kaiming_normal",
        "model::o_dim": 1000,
        "model::type": "vit_s_16",
        "optim::lr": 0.001,
        "optim::optimizer": "adamw",
        "optim::wd": 0.0001,
        "seed": 42,
        "training::batchsize": 256,
        "training::epochs_train": 90,
        "training::label_smoothing": 0.1,
        "training::mode": "sl",
        "training::temperature": 0,
        **overrides,
    }


def finetune_config(**overrides) -> dict:
    return {
        "dataset::name": "CIFAR100",
        "model::head::mlp": False,
        "model::head::hidden_dim": None,
        "model::init_type": "kaiming_normal",
        "model::o_dim": 100,
        "optim::lr": 0.001,
        "optim::optimizer": "AdamW",
        "optim::wd": 0,
        "seed": 42,
        "training::batchsize": 256,
        "training::epochs_train": 50,
        "training::label_smoothing": 0.1,
        "pretraining::model": PARENT,
        "pretraining::model::path": f"/ds2/model_zoos/zoos_vit/zoos/ImageNet/{PARENT}/checkpoint_2/checkpoints",
        "pretraining::mode": "sl",
        **overrides,
    }


def make_tiny_source(root, split: bool = False, mode: str = "sl") -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """A tiny parent and two fine-tunes, nested (`<parent>/<child>`) or split (`pretraining/<parent>`,
    `finetuning/<parent>/<child>`). Checkpoint widths differ per model. Returns {relpath: {epoch: state}}."""
    parent_dir = root / "pretraining" / PARENT if split else root / PARENT
    children_dir = root / "finetuning" / PARENT if split else parent_dir
    parent = trajectory(vit(1000, seed=1, **TINY), [0, 2])
    linear = trajectory(vit(100, seed=2, **TINY), [0, 3])
    mlp = trajectory(vit(100, "mlp", hidden=16, seed=3, **TINY), [1, 2])  # hidden size read from head.0's shape
    write_model(
        parent_dir,
        pretrain_config(
            **{"model::num_heads": 2, "training::mode": mode, "training::temperature": 0.07 if mode == "cl" else 0}
        ),
        {f"checkpoint_{e}": s for e, s in parent.items()},
        results(2),
    )
    write_model(
        children_dir / "ft_linear_adamw",
        finetune_config(),
        {f"checkpoint_{e:04d}": s for e, s in linear.items()},
        results(3),
    )
    write_model(
        children_dir / "ft_mlp_sgd",
        finetune_config(
            **{
                "optim::optimizer": "SGD",
                "optim::lr": 0.003,
                "seed": 6312,
                "model::head::mlp": True,
                "model::head::hidden_dim": 16,
            }
        ),
        {f"checkpoint_{e:06d}": s for e, s in mlp.items()},
        results(2, ray=False),
    )
    rel = parent_dir.relative_to(root).as_posix(), children_dir.relative_to(root).as_posix()
    return {rel[0]: parent, f"{rel[1]}/ft_linear_adamw": linear, f"{rel[1]}/ft_mlp_sgd": mlp}


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("vitmodelzoo") / "tiny"
    return root, make_tiny_source(root)


def by_source(zoo, src) -> dict[str, dict]:
    return {record["source"].removeprefix(str(src.resolve()) + "/"): record for record in zoo.records.values()}


def assert_reproduces(zoo, src, states) -> None:
    records = by_source(zoo, src)
    for relpath, epochs in states.items():
        entries = zoo.filter(model_id=records[relpath]["model_id"])
        assert [e.epoch for e in entries] == sorted(epochs)
        for entry in entries:
            got = entry.model().state_dict()
            assert got.keys() == epochs[entry.epoch].keys()
            for key, tensor in epochs[entry.epoch].items():
                assert torch.equal(got[key], tensor), f"{relpath} epoch {entry.epoch}: {key} differs"


def test_import_tiny_nested(tiny_source, tmp_path):
    src, states = tiny_source
    zoo = import_vitmodelzoo(src, tmp_path / "zoo", progress=False)

    assert zoo.architecture.to_dict() == {
        "model_name": "vit_small_patch16_224",
        "kwargs": {"img_size": 32, "embed_dim": 24, "depth": 2, "num_heads": 2},
    }
    assert zoo.dataset == "cifar100" and zoo.meta["datasets"] == ["cifar100", "imagenet"]
    assert len(zoo.records) == 3 and len(zoo) == 6
    records = by_source(zoo, src)
    parent, linear, mlp = records[PARENT], records[f"{PARENT}/ft_linear_adamw"], records[f"{PARENT}/ft_mlp_sgd"]
    assert parent["stage"] == "pretrain" and parent["parent_id"] is None and parent["model_id"].startswith("pt-")
    for child in (linear, mlp):
        assert child["stage"] == "finetune" and child["parent_id"] == parent["model_id"]
        assert child["parent_epoch"] == 2 and child["status"] == "done"
        assert re.fullmatch(r"ft-ft_\w+-[0-9a-f]{8}", child["model_id"])

    f = parent["factors"]
    assert (f["dataset"], f["objective"], f["optimizer"], f["lr"], f["weight_decay"], f["epochs"]) == (
        "imagenet",
        "supervised",
        "adamw",
        0.001,
        0.0001,
        90,
    )
    assert (f["seed"], f["batch_size"], f["label_smoothing"], f["init"]) == (42, 256, 0.1, "kaiming_normal")
    assert parent["head"] == {"head": "linear", "head_hidden": 32, "num_classes": 1000}
    f = linear["factors"]
    assert (f["dataset"], f["optimizer"], f["lr"], f["head"], f["seed"], f["epochs"]) == (
        "cifar100",
        "adamw",
        0.001,
        "linear",
        42,
        50,
    )
    f = mlp["factors"]
    assert (f["optimizer"], f["lr"], f["head"], f["head_hidden"], f["seed"]) == ("sgd", 0.003, "mlp", 16, 6312)
    assert mlp["head"] == {"head": "mlp", "head_hidden": 16, "num_classes": 100}
    assert mlp["source_config"] == json.loads((src / PARENT / "ft_mlp_sgd" / "config.json").read_text())

    # Ray lines: epoch = training_iteration (0 = initial evaluation); plain lines: line i -> epoch i + 1.
    # checkpoint_<N> is epoch N whatever its width; only train_/val_/test_ numbers are kept as metrics.
    assert [row["epoch"] for row in parent["history"]] == [0, 1, 2]
    assert [row["epoch"] for row in mlp["history"]] == [1, 2]
    assert [c["epoch"] for c in linear["checkpoints"]] == [0, 3]
    assert [c["epoch"] for c in mlp["checkpoints"]] == [1, 2]
    last = zoo.filter(model_id=parent["model_id"], epoch=2)[0]
    assert last.metrics == pytest.approx({"train_loss": 4.4, "train_acc": 0.02, "test_loss": 4.5, "test_acc": 0.04})
    assert zoo.filter(model_id=mlp["model_id"], epoch=1)[0].metrics["test_acc"] == pytest.approx(0.0)
    assert zoo.filter(model_id=mlp["model_id"], epoch=2)[0].metrics["test_acc"] == pytest.approx(0.02)

    assert_reproduces(zoo, src, states)
    # the same function as the original timm model (num_heads matters here, though it leaves no shape)
    original = vit(1000, **TINY)
    original.load_state_dict(states[PARENT][2])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(last.model()(images), original.eval()(images), rtol=0, atol=0)

    again = import_vitmodelzoo(src, tmp_path / "zoo", progress=False)  # stable ids: a re-import rewrites them
    assert again.records.keys() == zoo.records.keys()
    assert [(e.model_id, e.epoch, e.path) for e in again] == [(e.model_id, e.epoch, e.path) for e in zoo]


def test_import_split_layout_and_contrastive_parent(tmp_path):
    src = tmp_path / "src"
    states = make_tiny_source(src, split=True, mode="cl")
    zoo = import_vitmodelzoo(src, tmp_path / "zoo", progress=False)
    records = by_source(zoo, src)
    parent = records[f"pretraining/{PARENT}"]
    assert parent["stage"] == "pretrain" and parent["factors"]["objective"] == "contrastive"
    assert parent["factors"]["projection_dim"] == 1000 and parent["factors"]["temperature"] == 0.07
    for name in ("ft_linear_adamw", "ft_mlp_sgd"):
        child = records[f"finetuning/{PARENT}/{name}"]
        assert child["stage"] == "finetune" and child["parent_id"] == parent["model_id"]
    assert_reproduces(zoo, src, states)


def test_import_full_size_vit_small(tmp_path):
    src = tmp_path / "src"
    original = vit(1000)
    states = trajectory(original, [0, 1])
    relpath = "pretraining/sl_vit_s_16_224_seed_42_bs_256_lr_0.001_wd_0.0001_me_90"
    write_model(
        src / relpath, pretrain_config(), {"checkpoint_000000": states[0], "checkpoint_000001": states[1]}, results(1)
    )
    zoo = import_vitmodelzoo(src, tmp_path / "zoo", progress=False)
    assert zoo.architecture.to_dict() == {"model_name": "vit_small_patch16_224", "kwargs": {}}
    assert zoo.dataset == "imagenet" and len(zoo) == 2
    assert_reproduces(zoo, src, {relpath: states})
    original.load_state_dict(states[1])
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(zoo[1].model()(images), original.eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda: [torch.zeros(3)], id="list"),
        pytest.param(lambda: nn.Linear(2, 2), id="module"),
        pytest.param(lambda: {"vit.cls_token": "not a tensor"}, id="dict-of-str"),
        pytest.param(lambda: {"cls_token": torch.zeros(1, 1, 24)}, id="no-vit-prefix"),
    ],
)
def test_refuses_what_is_not_a_state_dict(tiny_source, tmp_path, payload):
    src = tmp_path / "src"
    shutil.copytree(tiny_source[0], src)
    bad = src / PARENT / "ft_mlp_sgd" / "checkpoint_000002" / "checkpoints"
    torch.save(payload(), bad)
    with pytest.raises(ImportErrorBadInput, match=re.escape(str(bad))):
        import_vitmodelzoo(src, tmp_path / "zoo", progress=False)


def test_refuses_weights_that_do_not_fit(tiny_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_source[0], src)
    path = src / PARENT / "ft_linear_adamw" / "checkpoint_0003" / "checkpoints"
    state = torch.load(path, weights_only=True)
    del state["vit.blocks.1.mlp.fc2.bias"]
    torch.save(state, path)
    with pytest.raises(ImportErrorBadInput, match=re.escape(str(path)) + ".*do not fit.*blocks.1.mlp.fc2.bias"):
        import_vitmodelzoo(src, tmp_path / "zoo", progress=False)


def test_refuses_mixed_architectures(tiny_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_source[0], src)
    wider = vit(1000, **{**TINY, "embed_dim": 48}).state_dict()
    write_model(src / "zz_wider", pretrain_config(**{"model::num_heads": 2}), {"checkpoint_1": wider}, results(1))
    with pytest.raises(ImportErrorBadInput, match="zz_wider.*differs from the zoo's"):
        import_vitmodelzoo(src, tmp_path / "zoo", progress=False)


def test_refuses_missing_or_empty_source(tmp_path):
    with pytest.raises(ImportErrorBadInput, match="does not exist"):
        import_vitmodelzoo(tmp_path / "nowhere", tmp_path / "zoo", progress=False)
    (tmp_path / "empty" / "finetuning").mkdir(parents=True)
    with pytest.raises(ImportErrorBadInput, match="no model directories"):
        import_vitmodelzoo(tmp_path / "empty", tmp_path / "zoo", progress=False)


def test_cli_import(tiny_source, tmp_path, capsys):
    src = tiny_source[0]
    main(["import", "vitmodelzoo", str(src), str(tmp_path / "zoo")])
    assert "3 models, 6 checkpoints" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "vitmodelzoo", str(tmp_path / "nowhere"), str(tmp_path / "zoo2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitzoo import: error: source") and len(err.splitlines()) == 1


def test_imported_checkpoints_tokenize_exactly(tiny_source, tmp_path):
    """The keys of the official zoo after import are timm's: the tokenizer reads them bit for bit."""
    from vitzoo.tokenizer import TokenSpec, detokenize, tokenize

    src, _ = tiny_source
    zoo = import_vitmodelzoo(src, tmp_path / "zoo", progress=False)
    for entry in zoo:
        state_dict = entry.state_dict()
        spec = TokenSpec.from_state_dict(state_dict, width=24, num_heads=zoo.architecture.num_heads)
        back = detokenize(tokenize(state_dict, spec).values, spec)
        assert all(torch.equal(back[k], v) for k, v in state_dict.items()), entry.model_id


class Payload:
    """A pickled object that would run code on load (here only `print`)."""

    def __reduce__(self):
        return print, ("this ran while loading",)


def test_refusal_of_an_unsafe_pickle_names_the_global_and_never_suggests_disabling_the_check(tiny_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_source[0], src)
    bad = src / PARENT / "ft_mlp_sgd" / "checkpoint_000002" / "checkpoints"
    torch.save({"vit.cls_token": torch.zeros(1, 1, 24), "extra": Payload()}, bad)
    with pytest.raises(ImportErrorBadInput) as refused:
        import_vitmodelzoo(src, tmp_path / "zoo", progress=False)
    message = str(refused.value)
    assert str(bad) in message and "refused to unpickle the Python object print" in message
    assert "weights_only" not in message and "safe_globals" not in message
