"""Fine-tunes for a parent the generator never saw: a function-space transfer generator.

Weight space does not transfer across parents: a parent's fine-tuning deltas are nearly orthogonal to every other
parent's (bundled zoo: w0 plus the other parents' mean delta of the same slot and head seed scores 0.105, the start
w0 alone 0.108, the real fine-tunes 0.791). What does transfer is what the fine-tunes *do*: on a fixed set of probe
images (unlabelled images of the fine-tuning dataset's train split), the fine-tuned models of different parents give
similar logits. So this generator learns, from the training parents' fine-tunes, a distribution over **probe
logits** per fine-tuning slot (optimizer, lr): their mean, and the spread of the runs around it (a Gaussian spanned
by the runs' deviations, scaled by `temperature`: 1 spreads draws like single runs, 0 gives the mean).

For a parent it reads the parent through its embedding: the features its body gives the probes (the pre-logits a
head reads). It draws target logits and fits the head on top of the exact start w0 (the parent's body with the head
a seed draws, as the zoo builder starts a fine-tune) in closed form: ridge regression of the target logits on the
features, pulled towards w0's head. A linear head is fit whole; an MLP head keeps its seeded first layer and fits
its readout on the hidden units. The body stays the parent's. The generator never sees a label: which class a probe
belongs to, it learns from the zoo's fine-tunes (`vitzoo generalisation` puts a head fit with the probes' true
labels beside it, and the learning curve over the number of training parents).

Shapes: N probes, C classes, D features (the embedding width, or an MLP head's hidden units), S slots, R runs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from vitzoo.errors import ConfigError, VitzooError
from vitzoo.generative.checkpoint import CheckpointError, open_checkpoint, require, write_checkpoint
from vitzoo.generative.data import slot_of
from vitzoo.zoo_builder.blueprint import Factors, Run
from vitzoo.zoo_builder.build import initial_state
from vitzoo.zoo_builder.data import load_split
from vitzoo.zoo_builder.families import parent_states
from vitzoo.zoo_builder.models import Architecture, build_vit
from vitzoo.zoo_builder.zoo import Zoo, ZooError

StateDict = dict[str, torch.Tensor]
FORMAT = "vitzoo-transfer"
START_FACTORS = ("head", "head_hidden", "init", "dataset", "classes")  # what a fine-tune's start depends on


class ParentError(VitzooError, ValueError):
    """A parent the generator cannot condition on: unknown, unreadable, or of another architecture."""


@dataclass
class TransferConfig:
    probes: int = 1024  # unlabelled probe images from the fine-tuning dataset's train split (all of it if fewer)
    ridge: float = 1e-4  # the head's pull towards w0's head, per probe
    temperature: float = 0.5  # spread of the drawn probe logits around the slot's mean (1: like single runs)
    seed: int = 0  # which probes

    def __post_init__(self):
        if not isinstance(self.probes, int) or self.probes < 16:
            raise ConfigError(f"probes must be an integer >= 16, got {self.probes!r}")
        if not self.ridge > 0:
            raise ConfigError(f"ridge must be positive, got {self.ridge!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TransferGenerator:
    config: TransferConfig
    architecture: Architecture
    start: dict  # the fine-tunes' start factors (START_FACTORS): the head w0 gets
    num_classes: int
    slots: list[tuple[str, float]]
    probes: torch.Tensor  # [N, channels, H, W]
    runs: list[torch.Tensor]  # per slot [R, N, C]: probe logits of the training fine-tunes
    parents: list[str]  # the training parents
    held_out: list[str]  # parents of the zoo kept out of training
    zoo_root: str
    sha256: str | None = None  # of the checkpoint it was loaded from

    @property
    def head(self) -> dict:
        return {"head": self.start["head"], "head_hidden": self.start["head_hidden"], "num_classes": self.num_classes}


def probe_split(dataset: str, count: int, seed: int, classes=None, data_root: str | None = None):
    """`count` images [N, channels, H, W] of the dataset's train split, drawn with `seed` (all of them when it has
    fewer), and their labels [N] (which the generator never reads: the labelled reference does)."""
    images, labels = load_split(dataset, "train", data_root, classes)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return images[order].float(), labels[order]


@torch.no_grad()
def probe_logits(state_dicts: list[StateDict], architecture: Architecture, head: dict, probes: torch.Tensor,
                 device: torch.device | str = "cpu", batch: int = 1024) -> torch.Tensor:  # fmt: skip
    """[m, N, C] logits of each model on the probes."""
    model = build_vit(architecture, head["num_classes"], head["head"], head["head_hidden"]).to(device).eval()
    out = []
    for state_dict in state_dicts:
        model.load_state_dict(state_dict)
        out.append(torch.cat([model(probes[i : i + batch].to(device)).cpu() for i in range(0, len(probes), batch)]))
    return torch.stack(out).double()


def fit_transfer(zoo: Zoo, config: TransferConfig, head: str = "linear", holdout_parents: list[str] = (),
                 data_root: str | None = None, device: torch.device | str = "cpu") -> TransferGenerator:  # fmt: skip
    """The generator of the zoo's finished fine-tunes with `head`, none of `holdout_parents`' among them."""
    if head not in ("linear", "mlp"):
        raise ConfigError(f"the transfer generator models one head type: head must be linear or mlp, got {head!r}")
    final = list(zoo.filter(stage="finetune", status="done", epoch="last", head=head))
    known = sorted({e.parent_id for e in final})
    unknown = sorted(set(holdout_parents) - set(known))
    if unknown:
        raise ConfigError(f"holdout_parents {unknown} are not parents of {head}-head fine-tunes in {zoo.root}: "
                          f"{', '.join(known)}")  # fmt: skip
    training = [e for e in final if e.parent_id not in set(holdout_parents)]
    if not training:
        raise ZooError(f"{zoo.root} has no finished {head}-head fine-tunes outside the held-out parents")
    start = {key: training[0].factors.get(key) for key in START_FACTORS}
    for entry in training:
        differs = [key for key in START_FACTORS if entry.factors.get(key) != start[key]]
        if differs:
            raise ZooError(f"{entry.model_id} starts differently from {training[0].model_id} ({differs}): "
                           "one transfer generator needs fine-tunes that start alike")  # fmt: skip
    num_classes = training[0].head["num_classes"]
    probes, _ = probe_split(start["dataset"], config.probes, config.seed, start["classes"], data_root)
    logits = probe_logits([e.state_dict() for e in training], zoo.architecture, training[0].head, probes, device)
    slots = sorted({slot_of(e.factors) for e in training})
    runs = [logits[[i for i, e in enumerate(training) if slot_of(e.factors) == slot]] for slot in slots]
    return TransferGenerator(
        config, zoo.architecture, start, num_classes, slots, probes, runs,
        parents=sorted({e.parent_id for e in training}), held_out=sorted(holdout_parents),
        zoo_root=zoo.location,
    )  # fmt: skip


def save_transfer(generator: TransferGenerator, path: Path, extra: dict | None = None) -> None:
    tensors = {"probes": generator.probes.float()} | {f"runs.{i}": r.float() for i, r in enumerate(generator.runs)}
    metadata = {
        "format": FORMAT,
        "config": generator.config.to_dict(),
        "architecture": generator.architecture.to_dict(),
        "start": generator.start,
        "num_classes": generator.num_classes,
        "slots": [list(s) for s in generator.slots],
        "parents": generator.parents,
        "held_out": generator.held_out,
        "zoo": generator.zoo_root,
        **(extra or {}),
    }
    write_checkpoint(path, tensors, metadata)


def load_transfer(path: str | Path) -> TransferGenerator:
    path = Path(path)
    weights, metadata, config = open_checkpoint(path, FORMAT, TransferConfig)
    slots = [(str(o), float(lr)) for o, lr in require(metadata, "slots", list, path)]
    start = require(metadata, "start", dict, path)
    if sorted(start) != sorted(START_FACTORS):
        raise CheckpointError(f"{path}: its start must record exactly {', '.join(START_FACTORS)}")
    num_classes = require(metadata, "num_classes", int, path)
    probes = weights.get("probes")
    runs = [weights.get(f"runs.{i}") for i in range(len(slots))]
    if probes is None or probes.dim() != 4:
        raise CheckpointError(f"{path}: it lacks its probe images [N, channels, H, W]")
    for i, r in enumerate(runs):
        if r is None or r.dim() != 3 or tuple(r.shape[1:]) != (len(probes), num_classes) or len(r) == 0:
            raise CheckpointError(f"{path}: runs.{i} must be a tensor [R, {len(probes)}, {num_classes}]")
    return TransferGenerator(
        config, Architecture(**require(metadata, "architecture", dict, path)), start, num_classes, slots,
        probes, [r.double() for r in runs], require(metadata, "parents", list, path),
        require(metadata, "held_out", list, path), require(metadata, "zoo", str, path),
        hashlib.sha256(path.read_bytes()).hexdigest(),
    )  # fmt: skip


def read_parent(spec: str, zoo: Zoo | None) -> tuple[str, StateDict]:
    """A parent's name and weights: a pre-trained model id of `zoo` (its checkpoint its fine-tunes start from), or
    the path of a state dict (safetensors, or a torch file read with weights_only=True)."""
    path = Path(spec)
    if path.is_file():
        try:
            state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        except Exception as error:  # any unreadable file: bad input
            raise ParentError(f"cannot read the parent checkpoint {path}: {error}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ParentError(f"{path} is not a state dict (a flat mapping of names to tensors)")
        return path.stem, state
    if zoo is None:
        raise ParentError(f"parent {spec!r} is no file, and there is no zoo to find it in")
    pretrained = zoo.filter(model_id=spec, stage="pretrain")
    if not len(pretrained):
        ids = sorted({e.model_id for e in zoo.filter(stage="pretrain")})
        raise ParentError(f"parent {spec!r} is neither a file nor a pre-trained model of {zoo.root} ({', '.join(ids)})")
    children = list(zoo.filter(stage="finetune", parent_id=spec))
    if children:
        return spec, parent_states(zoo, children[:1])[spec]
    return spec, zoo.filter(model_id=spec, epoch="last")[0].state_dict()


def start_for(generator: TransferGenerator, parent: StateDict, head_seed: int) -> StateDict:
    """w0: the parent's body with the head `head_seed` draws, exactly as the zoo builder starts a fine-tune; a parent
    of another architecture is refused with the tensors that differ."""
    template = build_vit(generator.architecture, generator.num_classes, generator.start["head"],
                         generator.start["head_hidden"]).state_dict()  # fmt: skip
    body = {k: v for k, v in template.items() if not k.startswith("head.")}
    missing = sorted(set(body) - set(parent))
    mismatched = [f"{k} {tuple(parent[k].shape)} vs {tuple(v.shape)}" for k, v in body.items()
                  if k in parent and parent[k].shape != v.shape]  # fmt: skip
    extra = sorted(k for k in parent if k not in body and not k.startswith("head."))
    if missing or mismatched or extra:
        if mismatched:
            what = f"shapes differ: {'; '.join(mismatched[:2])}"
        elif missing:
            what = f"it lacks {', '.join(missing[:3])}"
        else:
            what = f"it has tensors the generator's ViT lacks: {', '.join(extra[:3])}"
        raise ParentError(f"the parent is not the generator's architecture {generator.architecture.to_dict()}: {what}")
    factors = Factors(seed=head_seed, **{k: v for k, v in generator.start.items() if v is not None})
    run = Run("start", "finetune", factors, "parent")
    return initial_state(run, generator.architecture, {k: v.float() for k, v in parent.items()})


@torch.no_grad()
def head_inputs(generator: TransferGenerator, start: StateDict, images: torch.Tensor) -> torch.Tensor:
    """[N, D] what the head's fitted layer reads for each image under the start: the pre-logits (a linear head), or
    the seeded first layer's hidden units (an MLP head)."""
    model = build_vit(generator.architecture, generator.num_classes, generator.start["head"],
                      generator.start["head_hidden"]).eval()  # fmt: skip
    model.load_state_dict(start)
    features = model.forward_head(model.forward_features(images), pre_logits=True)
    if generator.start["head"] == "mlp":
        features = torch.relu(model.head[0](features))
    return features.double()


def fitted_layer(generator: TransferGenerator) -> str:
    return "head" if generator.start["head"] == "linear" else "head.2"


def fit_heads(inputs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              ridge: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Ridge regression of targets [B, N, C] on inputs [N, D], pulled towards the layer (weight [C, D], bias [C]):
    argmin_W |[X 1] W - Z|^2 / N + ridge |W - W0|^2. Returns weights [B, C, D] and biases [B, C]."""
    n = len(inputs)
    x = torch.cat([inputs, torch.ones(n, 1, dtype=inputs.dtype)], dim=1)  # [N, D+1]
    prior = torch.cat([weight.T, bias[None]], dim=0).double()  # [D+1, C]
    gram = x.T @ x / n + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    right = torch.einsum("nd,bnc->bdc", x, targets.double()) / n + ridge * prior  # [B, D+1, C]
    solution = torch.linalg.solve(gram, right)  # [B, D+1, C]
    return solution[:, :-1].transpose(1, 2), solution[:, -1]


def draw_targets(generator: TransferGenerator, slots: list[int], temperature: float, seed: int) -> torch.Tensor:
    """[B, N, C] probe logits, one draw per listed slot: the slot's mean plus `temperature` times a Gaussian spanned
    by its runs' deviations (covariance: theirs)."""
    rng = torch.Generator().manual_seed(seed)
    draws = []
    for s in slots:
        runs = generator.runs[s]  # [R, N, C]
        mean = runs.mean(0)
        eps = torch.randn(len(runs), generator=rng, dtype=torch.float64)
        draws.append(mean + temperature * torch.einsum("r,rnc->nc", eps, runs - mean) / math.sqrt(len(runs)))
    return torch.stack(draws)


def slot_index(generator: TransferGenerator, optimizer: str | None, lr: float | None) -> int | None:
    """The slot of an (optimizer, lr) condition; None for none."""
    if optimizer is None and lr is None:
        return None
    if optimizer is None or lr is None:
        raise ConfigError("condition on optimizer and lr together")
    for i, (o, rate) in enumerate(generator.slots):
        if o == optimizer and math.isclose(rate, float(lr), rel_tol=1e-6):
            return i
    raise ConfigError(f"optimizer={optimizer} lr={lr} is no slot the generator learned: {generator.slots}")


def sample_transfer(generator: TransferGenerator, parent: StateDict, parent_name: str, n: int, seed: int = 0,
                    head_seed: int = 0, optimizer: str | None = None, lr: float | None = None,
                    temperature: float | None = None) -> list[tuple[StateDict, dict, dict]]:  # fmt: skip
    """`n` fine-tunes of the parent: (state dict, factors, head) triples as `write_sampled` takes them; without an
    optimizer/lr condition each draw takes a slot uniformly at random."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    temperature = generator.config.temperature if temperature is None else temperature
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    fixed = slot_index(generator, optimizer, lr)
    rng = torch.Generator().manual_seed(seed)
    slots = [fixed] * n if fixed is not None else torch.randint(len(generator.slots), (n,), generator=rng).tolist()
    start = start_for(generator, parent, head_seed)
    layer = fitted_layer(generator)
    inputs = head_inputs(generator, start, generator.probes)
    targets = draw_targets(generator, slots, temperature, seed)
    weights, biases = fit_heads(inputs, targets, start[f"{layer}.weight"], start[f"{layer}.bias"],
                                generator.config.ridge)  # fmt: skip
    samples = []
    for i, s in enumerate(slots):
        state = dict(start) | {f"{layer}.weight": weights[i].float(), f"{layer}.bias": biases[i].float()}
        optimizer_i, lr_i = generator.slots[s]
        factors = {"method": "transfer", "generator": generator.sha256, "parent": parent_name, "head_seed": head_seed,
                   "optimizer": optimizer_i, "lr": lr_i, "temperature": temperature}  # fmt: skip
        samples.append((state, factors, generator.head))
    return samples
