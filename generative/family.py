"""Families of a fine-tuned zoo as bases: a family's start w0 and the final delta of its run in every slot.

A slot is one fine-tuning condition (optimizer, learning rate); every family of a blueprint zoo ran each slot
once. `FamilyBasis.decode(family, a)` gives w0 + sum_k a_k * delta_k exactly (float64 accumulation);
`distances(family, a)` the L2 distance of such a model to each of the family's runs without building it
(from the Gram matrix of the deltas). Only complete families (a finished run in every slot) are used.

Memory: a family's weights (its start and K runs, float32 as stored) are read from the zoo when first
decoded and kept while they fit `cache_bytes`; beyond that the least recently used family is dropped and
read again when needed. The bundled zoo fits whole; a ViT-S/16 zoo (616 MB per family) keeps a few.

Shapes: F families, K slots, P parameters.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from vitzoo.errors import ConfigError
from vitzoo.generative.data import HEADS, slot_of
from vitzoo.zoo_builder.families import family_key, family_start, parent_states
from vitzoo.zoo_builder.zoo import Zoo, ZooEntry, ZooError

StateDict = dict[str, torch.Tensor]
FamilyWeights = tuple[StateDict, StateDict]  # (start, runs: tensors [K, *shape]), float32 as stored


class FamilyBasis:
    def __init__(self, zoo: Zoo, head: str = "linear", cache_bytes: int = 4 * 2**30):
        if head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        wanted = {} if head == "all" else {"head": head}
        final = [e for e in zoo.filter(stage="finetune", status="done", epoch="last", **wanted)]
        if not final:
            raise ZooError(f"{zoo.root} has no finished fine-tuned models with head={head}")
        self.zoo_root = zoo.location  # "bundled" keeps the shipped generator portable; a Hub zoo: repo@commit
        self.head = head
        self.dataset = zoo.dataset
        self.architecture = zoo.architecture
        self.slots: list[tuple[str, float]] = sorted({slot_of(e.factors) for e in final})
        grouped: dict[tuple, dict[tuple, ZooEntry]] = {}
        for entry in final:
            grouped.setdefault(family_key(entry.factors, entry.parent_id), {})[slot_of(entry.factors)] = entry
        complete = {key: members for key, members in grouped.items() if len(members) == len(self.slots)}
        if not complete:
            raise ZooError(f"no family of {zoo.root} ran every fine-tuning condition {self.slots}")
        self.skipped = len(grouped) - len(complete)
        self.families: list[tuple] = sorted(complete)
        self.members: list[list[ZooEntry]] = [[complete[key][slot] for slot in self.slots] for key in self.families]
        self._zoo = zoo
        self._parents = parent_states(zoo, [members[0] for members in self.members])
        self._cache: OrderedDict[int, FamilyWeights] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._checked: set[int] = set()  # families whose members were checked to share their start
        gram = []
        for family in range(self.num_families):
            start, runs = self._weights(family)
            flat = torch.cat([(runs[k].double() - start[k].double()).flatten(1) for k in start], dim=1)  # [K, P]
            gram.append(flat @ flat.T)
        self.gram = torch.stack(gram)  # [F, K, K]
        self.val_acc = torch.tensor([[m.metrics.get("val_acc") or 0.0 for m in ms] for ms in self.members])  # [F, K]

    def _weights(self, family: int) -> FamilyWeights:
        """The family's start and runs, from the cache or read (and checked) from the zoo."""
        if family in self._cache:
            self._cache.move_to_end(family)
            return self._cache[family]
        members = self.members[family]
        start = family_start(self._zoo, members[0], self._parents)
        if family not in self._checked:  # once: a family read again after eviction was checked already
            for member in members[1:]:
                _check_same_start(self._zoo, members[0], member, start)
            self._checked.add(family)
        weights = [m.state_dict() for m in members]
        runs = {k: torch.stack([w[k] for w in weights]) for k in start}
        self._cache[family] = (start, runs)
        while len(self._cache) > 1 and sum(map(_bytes, self._cache.values())) > self._cache_bytes:
            self._cache.popitem(last=False)
        return start, runs

    def head_of(self, family: int) -> dict:
        """The head of a family's models: {"head", "head_hidden", "num_classes"}."""
        _, head, head_hidden, _, _ = self.families[family]
        return {"head": head, "head_hidden": head_hidden, "num_classes": self.members[family][0].head["num_classes"]}

    @property
    def num_families(self) -> int:
        return len(self.families)

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    def decode(self, family: int, coordinates: torch.Tensor) -> StateDict:
        """w0 + sum_k a_k delta_k as float32 tensors; coordinates [K]."""
        a = coordinates.double()
        start, runs = self._weights(family)
        return {
            k: (w0.double() + torch.einsum("k,k...->...", a, runs[k].double() - w0.double())).float()
            for k, w0 in start.items()
        }

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


def _bytes(weights: FamilyWeights) -> int:
    return sum(v.numel() * v.element_size() for part in weights for v in part.values())


def _check_same_start(zoo: Zoo, first: ZooEntry, member: ZooEntry, start: StateDict) -> None:
    """Members of a family must share their start (true by construction for a zoo we built; an imported
    zoo's epoch-0 checkpoints say it)."""
    initial = zoo.filter(model_id=member.model_id, epoch=0)
    if len(initial) and any(not torch.equal(v, start[k]) for k, v in initial[0].state_dict().items()):
        raise ZooError(
            f"{first.model_id} and {member.model_id} share parent, head and seed but not their initial weights; "
            "the family bases need runs that started from the same weights"
        )
