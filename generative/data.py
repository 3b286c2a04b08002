"""The training data of the generators: a zoo's fine-tuned checkpoints as deltas from their exact start.

A fine-tune starts from its parent's weights with a fresh head drawn from its seed, so its starting point
(`zoo_builder.build.initial_state`) is known exactly; what fine-tuning adds is the delta w - w0. Models with
the same parent, head type and head seed share w0: they form a **family**, and everything we measured
says families are the unit of generation: interpolating two members of one family keeps (even slightly
raises) their accuracy, far above isotropic noise at the same distance, while mixing two head seeds
collapses (numbers in generative/diffusion.py). Generators therefore model deltas, conditioned on the family,
and add the family's w0 back on decoding.

One head structure per set (token sequences must agree): `head="linear"` or `"mlp"`; `head="all"` holds the
fine-tunes of both head types as the deltas of their bodies alone (every tensor but `head.*`), for embeddings
and probes that compare head types (such a set decodes bodies, not whole models).
Deltas are standardised per tensor over the zoo (`tokenizer.Normalizer`), tokenized row-aligned
(`tokenizer.TokenSpec`) and divided by their own scale: each checkpoint's RMS over its real token values
(`DeltaSet.scales`). Fine-tuning deltas differ by more than 10x in size across learning rates (bundled zoo),
so an error that is small for a large delta swamps a small one; with each delta at unit scale, an error is
relative to the model it belongs to, and the scale is kept exactly beside the tokens.
`DeltaSet` holds them all in memory ([n, T, d] float32: a few MB for the bundled zoo).

Shapes: n checkpoints, T tokens, d token width, P position fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitzoo.errors import ConfigError
from vitzoo.tokenizer.normalize import Normalizer
from vitzoo.tokenizer.spec import TokenSpec
from vitzoo.tokenizer.tokens import detokenize, tokenize_batch
from vitzoo.zoo_builder.families import family_key, family_start, parent_states
from vitzoo.zoo_builder.models import HEADS as MODEL_HEADS
from vitzoo.zoo_builder.zoo import Zoo, ZooError

StateDict = dict[str, torch.Tensor]
TOKEN_WIDTH = 25  # the bundled ViT's rows (24 weights + bias) fit one token exactly


@dataclass
class Condition:
    """What a generator is conditioned on, per checkpoint."""

    family: int  # index into DeltaSet.families
    parent: int  # index into DeltaSet.parents
    optimizer: int  # index into OPTIMIZERS
    log_lr: float
    val_acc: float  # selection and conditioning use validation accuracy only


OPTIMIZERS = ("adamw", "sgd")
HEADS = (*MODEL_HEADS, "all")  # one head type, or every fine-tune of both
HOLDOUTS = ("none", "run", "family")


def slot_of(factors: dict) -> tuple[str, float]:
    """A fine-tune's condition slot: (optimizer, learning rate)."""
    return (factors["optimizer"], float(factors["lr"]))


def held_out(entries: list, holdout: str) -> set[str]:
    """The model ids a `holdout` rule keeps out of training, a deterministic function of the zoo: "run" holds out
    one run per family (family i, in sorted order, loses its run in slot i mod K, so every slot is held out
    somewhere), "family" every family i with i mod 5 == 0 (all its runs: a head seed of its parent never seen);
    "none" nothing."""
    if holdout not in HOLDOUTS:
        raise ConfigError(f"holdout must be one of {', '.join(HOLDOUTS)}, got {holdout!r}")
    if holdout == "none":
        return set()
    families: dict[tuple, dict[tuple, str]] = {}
    for entry in entries:
        families.setdefault(family_key(entry.factors, entry.parent_id), {})[slot_of(entry.factors)] = entry.model_id
    slots = sorted({slot for members in families.values() for slot in members})
    held = set()
    for i, key in enumerate(sorted(families)):
        members = families[key]
        if holdout == "family" and i % 5 == 0:
            held |= set(members.values())
        elif holdout == "run" and slots[i % len(slots)] in members:
            held.add(members[slots[i % len(slots)]])
    return held


def body(state_dict: StateDict) -> StateDict:
    """Every tensor but the head's: what fine-tunes with different heads have in common."""
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}


class DeltaSet:
    """Every kept checkpoint of a zoo's finished fine-tunes, as normalised delta tokens (see module docstring)."""

    def __init__(
        self,
        zoo: Zoo,
        head: str = "linear",
        spec: TokenSpec | None = None,
        normalizer: Normalizer | None = None,
        holdout: str = "none",
        part: str = "train",
    ):
        """`holdout` (see `held_out`) and `part`: the training models ("train") or those held out ("held_out"; pass
        the training set's spec and normalizer)."""
        if head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if part not in ("train", "held_out"):
            raise ConfigError(f"part must be train or held_out, got {part!r}")
        entries = list(zoo.filter(stage="finetune", status="done", **({} if head == "all" else {"head": head})))
        held = held_out(entries, holdout)
        entries = [e for e in entries if (e.model_id in held) == (part == "held_out")]
        if len(entries) < 2:
            raise ZooError(
                f"{zoo.root} has {len(entries)} finished fine-tuned checkpoints with head={head}; generators need more"
            )
        self.head = head
        self.zoo_root = zoo.location
        self.architecture = zoo.architecture
        self.num_heads = self.architecture.num_heads
        self.entries = entries
        parent_ids = sorted({e.parent_id for e in entries})
        self.parents = parent_ids
        parents = parent_states(zoo, entries)
        self.families: list[tuple] = []
        self.inits: list[StateDict] = []
        family_of = {}
        for entry in entries:
            key = family_key(entry.factors, entry.parent_id)
            if key not in family_of:
                family_of[key] = len(self.families)
                self.families.append(key)
                self.inits.append(family_start(zoo, entry, parents))
        deltas = []
        self.conditions: list[Condition] = []
        for entry in entries:
            family = family_of[family_key(entry.factors, entry.parent_id)]
            weights = body(entry.state_dict()) if head == "all" else entry.state_dict()  # bodies: shapes agree
            deltas.append({k: weights[k] - self.inits[family][k] for k in weights})
            self.conditions.append(
                Condition(
                    family,
                    parent_ids.index(entry.parent_id),
                    OPTIMIZERS.index(entry.factors["optimizer"]),
                    math.log10(entry.factors["lr"]),
                    entry.metrics.get("val_acc") or 0.0,
                )
            )
        self.spec = spec or TokenSpec.from_state_dict(deltas[0], TOKEN_WIDTH, self.num_heads)
        self.normalizer = normalizer or Normalizer.fit(deltas)
        normalized = [{k: v.float() for k, v in self.normalizer.normalize(d).items()} for d in deltas]
        self.positions = self.spec.positions()  # [T, P]
        self.mask = self.spec.mask()  # [T, d]
        values = tokenize_batch(normalized, self.spec).values.float()  # [n, T, d]
        self.scales = ((values.pow(2) * self.mask).sum(dim=(1, 2)) / self.mask.sum()).sqrt()  # [n]
        self.tokens = values / self.scales.clamp_min(1e-30)[:, None, None]  # [n, T, d], each at unit RMS

    def __len__(self) -> int:
        return len(self.entries)

    def decode(self, tokens: torch.Tensor, family: int, scale: float | torch.Tensor) -> StateDict:
        """Weights from unit-scale delta tokens [T, d], the delta's scale and the family whose start they are
        added to (for `head="all"`: the body's weights only)."""
        delta = self.normalizer.denormalize(detokenize(tokens.double() * float(scale), self.spec))
        return {k: (self.inits[family][k].double() + delta[k].double()).float() for k in delta}
