"""The population (vmap) path against the per-model loop, the functional optimizers, divergence handling."""

import pytest
import torch

from vitzoo.zoo_builder.blueprint import Factors, Run
from vitzoo.zoo_builder.build import initial_state
from vitzoo.zoo_builder.models import Architecture
from vitzoo.zoo_builder.population import PopulationTrainer

ARCH = Architecture(
    "vit_small_patch16_224",
    {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0},
)


def make_trainer(factors, mode):
    states = [initial_state(Run(f"m{i}", "pretrain", f), ARCH, None) for i, f in enumerate(factors)]
    return PopulationTrainer(factors, states, ARCH, torch.device("cpu"), mode)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("objective", ["supervised", "contrastive"])
def test_vmap_population_matches_per_model_loop(optimizer, objective):
    factors = [
        Factors(
            seed=s,
            lr=lr,
            weight_decay=wd,
            optimizer=optimizer,
            objective=objective,
            augment=aug,
            label_smoothing=ls,
            batch_size=32,
            train_subset=128,
            head="mlp",
            head_hidden=8,
            epochs=2,
        )
        for s, lr, wd, aug, ls in [(0, 3e-3, 0.0, 0.0, 0.0), (1, 1e-3, 1e-2, 0.5, 0.1), (2, 1e-2, 1e-4, 1.0, 0.2)]
    ]
    population, loop = make_trainer(factors, "vmap"), make_trainer(factors, "loop")
    for epoch in (1, 2):
        got, want = population.train_epoch(epoch).values, loop.train_epoch(epoch).values
        torch.testing.assert_close(
            torch.tensor(got["train_loss"]), torch.tensor(want["train_loss"]), rtol=1e-4, atol=1e-5
        )
    dim = ARCH.kwargs["embed_dim"]
    for got, want in zip(population.state_dicts(), loop.state_dicts()):
        assert got.keys() == want.keys()
        for key in got:
            if key.endswith("attn.qkv.bias"):
                # the key bias has an exactly-zero true gradient (softmax ignores a constant shift), so Adam
                # amplifies float noise there; it does not change the function. Compare q and v biases only.
                q_and_v = torch.cat([torch.arange(dim), torch.arange(2 * dim, 3 * dim)])
                got[key], want[key] = got[key][q_and_v], want[key][q_and_v]
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-5, msg=key)
    # the models really trained, and differently from each other
    first, second = population.state_dicts()[:2]
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], second["blocks.0.attn.qkv.weight"])
    got, want = population.evaluate("val").values, loop.evaluate("val").values
    # the loss is what the two paths determine alike; accuracies are not compared, because contrastive ranks have
    # many near-ties whose order depends on float summation order (thread count, vmap vs loop): a tolerance on them
    # is a coin toss on a busy machine
    torch.testing.assert_close(torch.tensor(got["val_loss"]), torch.tensor(want["val_loss"]), rtol=1e-4, atol=1e-5)


def test_models_in_a_population_are_independent():
    """A model trains to the same weights alone as inside a population of others."""
    base = dict(batch_size=32, train_subset=128, epochs=1)
    alone = make_trainer([Factors(seed=3, lr=2e-3, **base)], "vmap")
    crowd = make_trainer([Factors(seed=s, lr=lr, **base) for s, lr in [(0, 1e-2), (3, 2e-3), (5, 1e-4)]], "vmap")
    alone.train_epoch(1)
    crowd.train_epoch(1)
    dim = ARCH.kwargs["embed_dim"]
    q_and_v = torch.cat([torch.arange(dim), torch.arange(2 * dim, 3 * dim)])  # the key bias: see the test above
    for key, value in alone.state_dicts()[0].items():
        got = crowd.state_dicts()[1][key]
        if key.endswith("attn.qkv.bias"):
            got, value = got[q_and_v], value[q_and_v]
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_diverging_model_is_frozen_and_others_continue(mode):
    factors = [
        Factors(seed=0, optimizer="sgd", lr=lr, batch_size=32, train_subset=256, epochs=2) for lr in (1e-2, 1e12)
    ]
    trainer = make_trainer(factors, mode)
    before = trainer.state_dicts()
    metrics = trainer.train_epoch(1).values
    assert trainer.active.tolist() == [True, False]
    assert metrics["train_loss"][0] == metrics["train_loss"][0]  # finite
    after = trainer.state_dicts()
    assert all(torch.isfinite(v).all() for v in after[1].values()), "a diverged model keeps finite weights"
    assert not torch.equal(before[0]["head.weight"], after[0]["head.weight"])


def test_population_rejects_mixed_shapes():
    with pytest.raises(ValueError, match="agree on"):
        make_trainer([Factors(head="linear"), Factors(head="mlp")], "vmap")


def test_resume_state_round_trip_continues_identically():
    factors = [Factors(seed=s, lr=1e-3, batch_size=32, train_subset=128, epochs=2) for s in (0, 1)]
    straight = make_trainer(factors, "vmap")
    straight.train_epoch(1)
    saved = straight.resume_state()
    straight.train_epoch(2)
    resumed = make_trainer(factors, "vmap")
    resumed.load_resume_state(saved)
    resumed.train_epoch(2)
    for a, b in zip(straight.state_dicts(), resumed.state_dicts()):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_bf16_autocast_trains_with_finite_losses():
    factors = [Factors(seed=s, batch_size=32, train_subset=128, epochs=1) for s in (0, 1)]
    states = [initial_state(Run(f"m{i}", "pretrain", f), ARCH, None) for i, f in enumerate(factors)]
    trainer = PopulationTrainer(factors, states, ARCH, torch.device("cpu"), "vmap", precision="bf16")
    losses = trainer.train_epoch(1).values["train_loss"]
    assert all(loss == loss and loss < 10 for loss in losses)
    assert all(v.dtype == torch.float32 for v in trainer.state_dicts()[0].values()), "weights stay fp32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_population_matches_cpu_population():
    factors = [Factors(seed=s, lr=1e-3, batch_size=32, train_subset=128, epochs=1) for s in (0, 1, 2)]
    states = [initial_state(Run(f"m{i}", "pretrain", f), ARCH, None) for i, f in enumerate(factors)]
    on_cpu = PopulationTrainer(factors, states, ARCH, torch.device("cpu"), "vmap")
    on_gpu = PopulationTrainer(factors, states, ARCH, torch.device("cuda"), "vmap")
    on_cpu.train_epoch(1)
    on_gpu.train_epoch(1)
    for a, b in zip(on_cpu.state_dicts(), on_gpu.state_dicts()):
        for key in a:
            if not key.endswith("qkv.bias"):  # see test_vmap_population_matches_per_model_loop
                torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)


def assert_same_weights(got_states, want_states, rtol=1e-4, atol=2e-5):
    """Weights of two trainers alike; the key bias is left out (see test_vmap_population_matches_per_model_loop)."""
    dim = ARCH.kwargs["embed_dim"]
    q_and_v = torch.cat([torch.arange(dim), torch.arange(2 * dim, 3 * dim)])
    for got, want in zip(got_states, want_states):
        assert got.keys() == want.keys()
        for key in got:
            a, b = (got[key][q_and_v], want[key][q_and_v]) if key.endswith("attn.qkv.bias") else (got[key], want[key])
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=key)


# the paper's settings (configs/zoo/vit_s16_imagenet_cifar100.yaml) on Fashion-MNIST, one model with them off
PAPER_SUPERVISED = dict(loss="soft_target", mixup=0.8, cutmix=1.0, random_erasing=0.25, label_smoothing=0.1)
PAPER_FINETUNE = dict(PAPER_SUPERVISED, augment=0.25, hflip=0.5, rotation=10)
PAPER_SIMCLR = dict(
    augment=1.0,
    hflip=0.5,
    jitter_brightness=0.5,
    jitter_contrast=0.5,
    jitter_saturation=0.5,
    jitter_hue=0.1,
    jitter_prob=0.8,
    grayscale_prob=0.2,
    blur_kernel=9,
)


@pytest.mark.parametrize(
    "objective, settings",
    [("supervised", [{}, PAPER_SUPERVISED, PAPER_FINETUNE]), ("contrastive", [{}, PAPER_SIMCLR])],
)
def test_vmap_population_matches_per_model_loop_with_the_papers_settings(objective, settings):
    base = dict(objective=objective, batch_size=32, train_subset=128, epochs=1, dataset="fashion_mnist")
    factors = [Factors(seed=s, lr=3e-3, **base, **extra) for s, extra in enumerate(settings)]
    population, loop = make_trainer(factors, "vmap"), make_trainer(factors, "loop")
    got, want = population.train_epoch(1).values, loop.train_epoch(1).values
    torch.testing.assert_close(torch.tensor(got["train_loss"]), torch.tensor(want["train_loss"]), rtol=1e-4, atol=1e-5)
    assert_same_weights(population.state_dicts(), loop.state_dicts())


def test_mixup_applies_per_model_and_leaves_a_model_without_it_untouched():
    """Two models, one with Mixup/CutMix/erasing and one without, in one population: the one without gets the
    very batches and trains to the very weights it gets beside a plain twin; the other's batches are mixed."""
    base = dict(batch_size=32, train_subset=128, epochs=1, dataset="fashion_mnist", lr=3e-3)
    plain, twin = Factors(seed=0, **base), Factors(seed=1, **base)
    mixed = Factors(seed=1, **base, **PAPER_SUPERVISED)
    beside_mixed, beside_plain = make_trainer([plain, mixed], "vmap"), make_trainer([plain, twin], "vmap")

    images, labels = beside_mixed.split("train")
    steps, order, theta, theta2, seeds = beside_mixed._epoch_plan(1, len(labels))
    x, y = next(beside_mixed._batches(images, labels, order, steps))  # step 0's images
    x, y, soft = beside_mixed._augmented(x, y, theta, theta2, seeds, 0)
    untouched = images[order[:, 0]]  # [m, b, C, H, W]: the drawn images, no augmentation (augment 0)
    assert torch.equal(x[0], untouched[0])
    assert not torch.equal(x[1], untouched[1])
    k = plain.num_outputs
    assert soft.shape == (2, 32, k)
    assert not torch.equal(soft[1], torch.nn.functional.one_hot(y[1], k).float()), "mixed and smoothed targets"

    beside_mixed.train_epoch(1)
    beside_plain.train_epoch(1)
    for key, value in beside_plain.state_dicts()[0].items():
        assert torch.equal(beside_mixed.state_dicts()[0][key], value), key
    assert not torch.equal(beside_mixed.state_dicts()[1]["head.weight"], beside_plain.state_dicts()[1]["head.weight"])


def test_regularisers_depend_only_on_the_models_seed_and_restore_the_global_generators():
    """The timm/torchvision transforms draw from global generators: seeded per model and step, then restored."""
    import random

    import numpy as np

    base = dict(batch_size=32, train_subset=128, epochs=1, dataset="fashion_mnist", **PAPER_SUPERVISED)
    alone = make_trainer([Factors(seed=3, **base)], "loop")
    crowd = make_trainer([Factors(seed=s, **base) for s in (0, 3)], "loop")
    torch.manual_seed(123)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    batches = []
    for trainer, row in ((alone, 0), (crowd, 1)):
        images, labels = trainer.split("train")
        steps, order, theta, theta2, seeds = trainer._epoch_plan(1, len(labels))
        x, y = next(trainer._batches(images, labels, order, steps))  # step 0's images
        x, y, soft = trainer._augmented(x, y, theta, theta2, seeds, 0)
        batches.append((x[row], soft[row]))
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
