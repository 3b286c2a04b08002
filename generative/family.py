"""Families of a fine-tuned zoo as bases: a family's start w0 and the final delta of its run in every slot.

A slot is one fine-tuning condition (optimizer, learning rate); every family of a blueprint zoo ran each slot
once. `FamilyBasis.decode(family, a)` gives w0 + sum_k a_k * delta_k exactly (float64 accumulation);
`distances(family, a)` the L2 distance of such a model to each of the family's runs without building it
(from the Gram matrix of the deltas). Only complete families (a finished run in every slot) are used.

Shapes: F families, K slots, P parameters.
"""

from __future__ import annotations

import torch

from generative.data import family_key, family_start, parent_states
from zoo_builder.zoo import BUNDLED, Zoo, ZooEntry

StateDict = dict[str, torch.Tensor]


def slot_of(factors: dict) -> tuple[str, float]:
    return (factors["optimizer"], float(factors["lr"]))


class FamilyBasis:
    def __init__(self, zoo: Zoo, head: str = "linear"):
        final = [e for e in zoo.filter(stage="finetune", status="done", epoch="last", head=head)]
        if not final:
            raise ValueError(f"{zoo.root} has no finished fine-tuned models with a {head} head")
        self.zoo_root = "bundled" if zoo.root == BUNDLED else str(zoo.root)  # portable for the shipped generator
        self.head = head
        self.dataset = zoo.dataset
        self.architecture = zoo.architecture
        self.slots: list[tuple[str, float]] = sorted({slot_of(e.factors) for e in final})
        grouped: dict[tuple, dict[tuple, ZooEntry]] = {}
        for entry in final:
            grouped.setdefault(family_key(entry.factors, entry.parent_id), {})[slot_of(entry.factors)] = entry
        complete = {key: members for key, members in grouped.items() if len(members) == len(self.slots)}
        if not complete:
            raise ValueError(f"no family of {zoo.root} ran every fine-tuning condition {self.slots}")
        self.skipped = len(grouped) - len(complete)
        self.families: list[tuple] = sorted(complete)
        self.members: list[list[ZooEntry]] = [[complete[key][slot] for slot in self.slots] for key in self.families]
        parents = parent_states(zoo, {key[0] for key in self.families})
        self.inits: list[StateDict] = []
        self.deltas: list[StateDict] = []  # per family: tensors [K, *shape] (float64)
        gram = []
        for members in self.members:
            init = family_start(members[0], parents)
            weights = [m.state_dict() for m in members]
            delta = {k: torch.stack([w[k].double() - init[k].double() for w in weights]) for k in init}
            flat = torch.cat([v.flatten(1) for v in delta.values()], dim=1)  # [K, P]
            gram.append(flat @ flat.T)
            self.inits.append(init)
            self.deltas.append(delta)
        self.gram = torch.stack(gram)  # [F, K, K]
        self.val_acc = torch.tensor([[m.metrics.get("val_acc") or 0.0 for m in ms] for ms in self.members])  # [F, K]

    @property
    def num_families(self) -> int:
        return len(self.families)

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    def decode(self, family: int, coordinates: torch.Tensor) -> StateDict:
        """w0 + sum_k a_k delta_k as float32 tensors; coordinates [K]."""
        a = coordinates.double()
        init = self.inits[family]
        deltas = self.deltas[family]
        return {k: (init[k].double() + torch.einsum("k,k...->...", a, v)).float() for k, v in deltas.items()}

    def distances(self, family: int, coordinates: torch.Tensor) -> torch.Tensor:
        """[B, K] L2 distance of the models with coordinates [B, K] to each run of the family."""
        difference = coordinates.double()[:, None, :] - torch.eye(self.num_slots, dtype=torch.float64)  # [B, K, K]
        squared = torch.einsum("bki,ij,bkj->bk", difference, self.gram[family], difference)
        return squared.clamp_min(0).sqrt()

    def min_pairwise_distance(self) -> float:
        """The smallest distance between two runs of one family (each family's vertices)."""
        smallest = float("inf")
        for f in range(self.num_families):
            d = self.distances(f, torch.eye(self.num_slots, dtype=torch.float64))
            d.fill_diagonal_(float("inf"))
            smallest = min(smallest, d.min().item())
        return smallest

    def describe(self) -> dict:
        """What a generator checkpoint records to find and verify this basis again."""
        return {
            "zoo": self.zoo_root,
            "head": self.head,
            "slots": [list(s) for s in self.slots],
            "families": [list(key) for key in self.families],
            "members": [[[m.model_id, m.sha256] for m in ms] for ms in self.members],
        }
