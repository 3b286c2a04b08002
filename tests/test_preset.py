"""The paper's blueprint preset against the published configs, setting by setting.

`fixtures/vitmodelzoo_configs.json` transcribes the training settings of the official ViT Model Zoo
(ModelZoos/ViTModelZoo: example_configs/*.json and the transforms of data_preparation/*.py). Every transcribed
setting must be read off the preset here, and equal the paper's value or be one of the fixture's listed, justified
exceptions; an exception that no longer applies fails too.
"""

import json

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from vitzoo.errors import ConfigError
from vitzoo.zoo_builder import Zoo
from vitzoo.zoo_builder.augment import colour_transform
from vitzoo.zoo_builder.blueprint import LATER_FACTORS, Factors, blueprint_from_config, expand, expand_stage, model_id
from vitzoo.zoo_builder.optim import SGD_MOMENTUM

FIXTURE = json.loads((REPO / "tests" / "fixtures" / "vitmodelzoo_configs.json").read_text())
PRESET = REPO / "configs" / "zoo" / "vit_s16_imagenet_cifar100.yaml"

DATASETS = {"ImageNet1K": "imagenet", "CIFAR100": "cifar100"}
MODELS = {"vit_s_16": "vit_small_patch16_224"}
LOSSES = {"soft_target": "stce", "cross_entropy": "ce"}


def blur_sigma(f):
    blur = [
        t for t in colour_transform(0, 0, 0, 0, 0, 0, f.blur_kernel).transforms if type(t).__name__ == "GaussianBlur"
    ]
    return list(blur[0].sigma)


# setting -> (our value of one run's factors f in blueprint b, the paper's value as we spell it)
SETTINGS = {
    "dataset::name": (lambda b, f: f.dataset, DATASETS.get),
    "model::type": (lambda b, f: b.architecture.model_name, MODELS.get),
    "model::init_type": (lambda b, f: f.init, None),
    "model::o_dim": (lambda b, f: f.num_outputs, None),
    "model::dropout": (lambda b, f: f.dropout, None),
    "model::attn_dropout": (lambda b, f: b.architecture.kwargs.get("attn_drop_rate", 0), None),
    "model::head::mlp": (lambda b, f: f.head == "mlp", None),
    "model::head::hidden_dim": (lambda b, f: f.head_hidden if f.head == "mlp" else None, None),
    "model::freeze_encoder": (lambda b, f: False, None),  # fine-tuning always trains the whole model
    "optim::optimizer": (lambda b, f: f.optimizer, None),
    "optim::lr": (lambda b, f: f.lr, None),
    "optim::wd": (lambda b, f: f.weight_decay, None),
    "optim::momentum": (lambda b, f: SGD_MOMENTUM if f.optimizer == "sgd" else 0, None),
    "optim::scheduler": (lambda b, f: None, None),  # the trainer keeps the learning rate constant
    "seed": (lambda b, f: f.seed, None),
    "training::batchsize": (lambda b, f: f.batch_size, None),
    "training::epochs_train": (lambda b, f: f.epochs, None),
    "training::label_smoothing": (lambda b, f: f.label_smoothing, lambda v: v or 0.0),
    "training::temperature": (lambda b, f: f.temperature if f.objective == "contrastive" else 0, None),
    "training::loss": (lambda b, f: "info_nce" if f.objective == "contrastive" else LOSSES[f.loss], None),
    "validation::loss": (lambda b, f: "info_nce" if f.objective == "contrastive" else "ce", None),
    "training::randerase": (lambda b, f: f.random_erasing, lambda v: v or 0.0),
    "training::mixup": (lambda b, f: f.mixup, lambda v: v or 0.0),
    "training::cutmix": (lambda b, f: f.cutmix, lambda v: v or 0.0),
    "training::mode": (lambda b, f: "cl" if f.objective == "contrastive" else "sl", None),
    "pretraining::mode": (lambda b, f: sorted({"cl" if p.objective == "contrastive" else "sl" for p in PARENTS}), None),
    # transforms
    "RandomHorizontalFlip": (lambda b, f: {"p": f.hflip}, None),
    "RandomRotation": (lambda b, f: {"degrees": f.rotation}, None),
    "ColorJitter": (
        lambda b, f: {
            "brightness": f.jitter_brightness,
            "contrast": f.jitter_contrast,
            "saturation": f.jitter_saturation,
            "hue": f.jitter_hue,
            "p": f.jitter_prob,
        },
        None,
    ),
    "RandomGrayscale": (lambda b, f: {"p": f.grayscale_prob}, None),
    "GaussianBlur": (lambda b, f: {"kernel_size": f.blur_kernel, "sigma": blur_sigma(f)}, None),
    "RandomResizedCrop": (lambda b, f: {"augment": f.augment}, None),
    "Resize+RandomCrop": (lambda b, f: {"augment": f.augment}, None),
}

BLUEPRINT = blueprint_from_config(OmegaConf.load(PRESET))
PARENTS = expand_stage(BLUEPRINT.pretrain)
RUNS = {
    "pretrain/supervised": [f for f in PARENTS if f.objective == "supervised"],
    "pretrain/contrastive": [f for f in PARENTS if f.objective == "contrastive"],
    "finetune": expand_stage(BLUEPRINT.finetune),
}
EXCEPTIONS = {(e["stage"], e["setting"]): e for e in FIXTURE["exceptions"]}


def paper_settings(stage: dict) -> dict:
    settings = dict(stage["config"])
    transforms = dict(stage["transforms"])
    if "Resize" in transforms:  # resize then random crop: one setting, our `augment` crop
        transforms["Resize+RandomCrop"] = {"Resize": transforms.pop("Resize")["size"]}
        transforms["Resize+RandomCrop"]["RandomCrop"] = transforms.pop("RandomCrop")["size"]
    return {**settings, **transforms}


def ours(setting: str, runs: list) -> object:
    """The preset's value of a setting over a stage's runs: one value, or the sorted list the grid spans."""
    values = {json.dumps(SETTINGS[setting][0](BLUEPRINT, f), sort_keys=True) for f in runs}
    values = sorted((json.loads(v) for v in values), key=json.dumps)
    return values[0] if len(values) == 1 else values


@pytest.mark.parametrize("stage", list(RUNS))
def test_preset_matches_the_published_configs_setting_by_setting(stage):
    assert FIXTURE["stages"][stage]["config_file"] in FIXTURE["source"]["files"]
    for setting, paper in paper_settings(FIXTURE["stages"][stage]).items():
        assert setting in SETTINGS, f"{setting}: transcribed but not compared"
        convert = SETTINGS[setting][1]
        paper = convert(paper) if convert else paper
        mine = ours(setting, RUNS[stage])
        exception = EXCEPTIONS.get((stage, setting))
        if exception is None:
            assert mine == paper, f"{stage} {setting}: paper {paper!r}, preset {mine!r}"
        else:
            assert mine != paper, f"{stage} {setting}: listed as an exception but equal to the paper"
            assert (exception["paper"], exception["ours"]) == (paper, mine), f"{stage} {setting}: stale exception"
            assert len(exception["why"]) > 20, f"{stage} {setting}: say why"


def test_every_exception_names_a_transcribed_setting():
    for stage, setting in EXCEPTIONS:
        assert setting in paper_settings(FIXTURE["stages"][stage]), (stage, setting)


def test_later_factors_leave_the_ids_and_records_of_older_zoos_unchanged():
    bundled = Zoo.open("bundled")
    (stored,) = bundled.meta["blueprints"]
    blueprint = blueprint_from_config(stored)
    assert blueprint.to_dict() == stored, "zoo.json's blueprint is written as it was"
    runs = expand(blueprint)
    assert {run.model_id for run in runs} == set(bundled.records)
    for run in runs:
        assert run.factors.to_dict() == bundled.records[run.model_id]["factors"]
    # a later factor away from its default is part of the id
    paper = Factors(loss="soft_target", mixup=0.8)
    assert {"loss", "mixup"} <= set(paper.to_dict()) and not set(Factors().to_dict()) & set(LATER_FACTORS)
    assert model_id("pretrain", paper, None) != model_id("pretrain", Factors(), None)


@pytest.mark.parametrize(
    "factors, message",
    [
        (dict(mixup=0.8), "need loss=soft_target"),
        (dict(loss="soft_target", cutmix=1.0, batch_size=33), "even batch_size"),
        (dict(objective="contrastive", random_erasing=0.25), "supervised settings"),
        (dict(hflip=0.5, dataset="digits"), "flips do not preserve"),
        (dict(blur_kernel=4), "odd"),
        (dict(jitter_hue=0.6), "hue <= 0.5"),
    ],
)
def test_bad_paper_settings_are_refused(factors, message):
    with pytest.raises(ConfigError, match=message):
        Factors(**factors).validate()
