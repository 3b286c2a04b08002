"""Families of a fine-tuned zoo: the runs that started from identical weights, and that start.

A fine-tune starts from its parent's weights with a fresh head drawn from its seed, so its starting point
(`zoo_builder.build.initial_state`) is known exactly. Fine-tunes with the same parent, head type and head seed
share it: they form a **family**. The generators model fine-tunes as deltas from a family's start, and the
novelty measurements ask how far a sample lies from a family's span; both read families from here.
"""

from __future__ import annotations

import torch

from vitzoo.zoo_builder.blueprint import Factors, Run
from vitzoo.zoo_builder.build import initial_state
from vitzoo.zoo_builder.zoo import Zoo, ZooEntry, ZooError

StateDict = dict[str, torch.Tensor]


class UnknownStartError(ZooError):
    """The weights a fine-tune started from cannot be known from the zoo."""


def family_key(factors: dict, parent_id: str) -> tuple:
    """Models with equal keys start from identical weights."""
    return (parent_id, factors["head"], factors["head_hidden"], factors["seed"], factors["init"])


def family_start(zoo: Zoo, entry: ZooEntry, parents: dict[str, StateDict]) -> StateDict:
    """The exact weights a fine-tune started from. When the zoo kept the run's epoch-0 checkpoint (its
    initialisation; imported zoos do), that is it. Otherwise the zoo builder's own draw is rebuilt: the
    parent's body with the head the run's seed drew. An imported run without epoch 0 has no known start."""
    initial = zoo.filter(model_id=entry.model_id, epoch=0)
    if len(initial):
        return initial[0].state_dict()
    if "source" in zoo.records[entry.model_id]:  # imported: its head was drawn by someone else's code
        raise UnknownStartError(
            f"{entry.model_id} was imported without its initialisation (checkpoint_0), so the weights its "
            "fine-tuning started from are unknown; generators model fine-tunes as deltas from that start"
        )
    run = Run(entry.model_id, "finetune", Factors(**entry.factors), entry.parent_id)
    return initial_state(run, entry.architecture, parents[entry.parent_id])


def parent_states(zoo: Zoo, fine_tunes) -> dict[str, StateDict]:
    """The weights each listed fine-tune's parent had when fine-tuning started: its checkpoint at the
    recorded `parent_epoch`, else its last one (one epoch per parent: the families assume it)."""
    epochs: dict[str, int | str] = {}
    for entry in fine_tunes:
        epoch = zoo.records[entry.model_id].get("parent_epoch", "last")
        if epochs.setdefault(entry.parent_id, epoch) != epoch:
            raise UnknownStartError(
                f"fine-tunes of {entry.parent_id} start from different epochs of it: {epochs[entry.parent_id]}, {epoch}"
            )
    states = {}
    for parent_id, epoch in epochs.items():
        found = zoo.filter(model_id=parent_id, epoch=epoch)
        if not len(found):
            raise UnknownStartError(f"the parent {parent_id} has no checkpoint at epoch {epoch}")
        states[parent_id] = found[0].state_dict()
    return states


def family_starts(zoo: Zoo, entries: list[ZooEntry]) -> list[tuple[StateDict, list[int]]] | None:
    """The families among `entries` (checkpoints of `zoo`, which may be a filtered view): each family's start
    and the indices of its members in `entries`. Entries that are not fine-tunes belong to no family. None
    when a start is unknown (an imported fine-tune without its checkpoint_0) or no entry is a fine-tune."""
    fine_tunes = [i for i, e in enumerate(entries) if e.stage == "finetune" and e.parent_id is not None]
    if not fine_tunes:
        return None
    whole = Zoo.open(zoo.root)  # parents may lie outside the view
    try:
        parents = parent_states(whole, [entries[i] for i in fine_tunes])
        grouped: dict[tuple, list[int]] = {}
        for i in fine_tunes:
            grouped.setdefault(family_key(entries[i].factors, entries[i].parent_id), []).append(i)
        return [(family_start(whole, entries[members[0]], parents), members) for members in grouped.values()]
    except UnknownStartError:  # no spans; the report says so
        return None
