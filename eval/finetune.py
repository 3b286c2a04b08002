"""Fine-tuning as an evaluation protocol (SANE's): accuracy after 0, 1, ..., E epochs of training from given
weights, for samples, from-scratch models and zoo models alike.

The models are trained together by the zoo builder's `PopulationTrainer` (stacked weights, one vmapped step;
the same code, optimizer and data order as the zoo's own training), one population per head structure and at
most `POPULATION` models (a model trains to the same weights in any population, and activations grow with the
population: the demo's ~500 models at once peaked at 4.2 GB). Every model gets the same recipe (optimizer,
learning rate, batch size) and its own data order from `seed + i`, so the comparison isolates where the weights
start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitzoo.errors import ConfigError
from vitzoo.zoo_builder.architecture import head_from_state_dict
from vitzoo.zoo_builder.blueprint import Factors
from vitzoo.zoo_builder.models import Architecture
from vitzoo.zoo_builder.population import PopulationTrainer

StateDict = dict[str, torch.Tensor]
POPULATION = 64  # models trained together at most


@dataclass
class FinetuneRecipe:
    epochs: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    seed: int = 0


def finetune_curves(
    models: list[tuple[str, StateDict]],
    architecture: Architecture,
    dataset: str,
    recipe: FinetuneRecipe,
    split: str = "test",
    device: torch.device | str = "cpu",
    data_root: str | None = None,
) -> dict[str, list[float]]:
    """name -> [accuracy on `split` after 0, 1, ..., recipe.epochs epochs] (see module docstring)."""
    if recipe.epochs < 0:
        raise ConfigError(f"finetune epochs must be >= 0, got {recipe.epochs}")
    device = torch.device(device)
    groups: dict[tuple, list[int]] = {}
    for i, (_, state_dict) in enumerate(models):
        groups.setdefault(tuple(sorted(head_from_state_dict(state_dict).items())), []).append(i)
    curves: dict[str, list[float]] = {}
    chunks = [(key, members[start : start + POPULATION]) for key, members in groups.items()
              for start in range(0, len(members), POPULATION)]  # fmt: skip
    for key, members in chunks:
        head = dict(key)
        factors = [
            Factors(
                seed=recipe.seed + i, optimizer=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay,
                batch_size=recipe.batch_size, epochs=max(recipe.epochs, 1), head=head["head"],
                head_hidden=head["head_hidden"], dataset=dataset, init="torch",
            )
            for i in members
        ]  # fmt: skip
        if factors[0].num_outputs != head["num_classes"]:
            raise ConfigError(f"heads with {head['num_classes']} outputs cannot be fine-tuned on {dataset}")
        trainer = PopulationTrainer(factors, [models[i][1] for i in members], architecture, device, data_root=data_root)
        accuracies = [trainer.evaluate(split).values[f"{split}_acc"]]
        for epoch in range(recipe.epochs):
            trainer.train_epoch(epoch)
            accuracies.append(trainer.evaluate(split).values[f"{split}_acc"])
        for position, i in enumerate(members):
            curves[models[i][0]] = [epoch_accuracies[position] for epoch_accuracies in accuracies]
    return {name: curves[name] for name, _ in models}
