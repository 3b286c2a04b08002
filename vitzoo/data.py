"""Weight datasets: a zoo selection as a `torch.utils.data.Dataset`, one item per checkpoint, for any training loop.

Three forms of the weights:
- `"state_dict"`: a dict of tensors with timm's key names (models of different heads may mix; the default collate
  then needs batches of one shape);
- `"flat"`: one float32 vector [P] in a fixed key order (`keys`, the model's own); `unflatten` gives the state dict
  back, exactly;
- `"tokens"`: values [T, d] of the tokenizer (`spec` holds their positions and mask; `detokenize` inverts them).

An item is a dict the default `DataLoader` collate batches:
    weights   the form above
    factors   {name: 0-d tensor}: numbers as int64 (all integers) or float32 (NaN where a model lacks the factor
              or records None); anything else (optimizer, head, dataset, ...) as an int64 code into
              `vocabulary[name]`
    metrics   {name: 0-d float32 tensor} of the checkpoint's epoch (NaN where not recorded)
    model_id, epoch, index

Reads are lazy: an item reads its checkpoint when asked (checked against its sha256, as every zoo read is), and
nothing holds weights between items. The dataset keeps what each item reads (path, sha256, size) and a table of
labels, so it pickles to `DataLoader` workers in about 0.3 kB per checkpoint (a bundled checkpoint holds 47 kB of
weights). Shapes come from the architecture's structure (built on the meta device), never from reading checkpoints.
For windows, normalisation and augmentations of tokens, see `vitzoo.tokenizer.dataset.TokenDataset`.

Shapes: P parameters, T tokens, d token width.
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch
from torch.utils.data import Dataset

from vitzoo.errors import ConfigError
from vitzoo.tokenizer.spec import TokenSpec
from vitzoo.tokenizer.tokens import tokenize
from vitzoo.zoo_builder.models import Architecture, build_vit
from vitzoo.zoo_builder.zoo import Zoo, ZooError, read_checkpoint

FORMS = ("state_dict", "flat", "tokens")
StateDict = dict[str, torch.Tensor]


class WeightDataError(ZooError):
    """A zoo selection that cannot make the dataset asked for (empty, or of mixed shapes in a form that needs one)."""


class WeightDataset(Dataset):
    """The checkpoints of `zoo` (a filtered `Zoo`, a path or `"bundled"`) as items; see the module docstring.

    Args:
        form: `"state_dict"`, `"flat"` or `"tokens"`.
        width: the token width d (`"tokens"` only; ignored when `spec` is given).
        spec: a token spec to use instead of deriving one from the architecture (`"tokens"` only).
    """

    def __init__(
        self, zoo: Zoo | str | os.PathLike, form: str = "state_dict", width: int = 16, spec: TokenSpec | None = None
    ):
        if form not in FORMS:
            raise ConfigError(f"unknown form {form!r}; expected one of {FORMS}")
        if spec is not None and form != "tokens":
            raise ConfigError(f"a token spec is for form='tokens', not {form!r}")
        zoo = zoo if isinstance(zoo, Zoo) else Zoo.open(zoo)
        if len(zoo) == 0:
            raise WeightDataError(f"the zoo selection is empty (zoo {zoo.root}): nothing to make a dataset of")
        architecture = json.dumps(zoo.architecture.to_dict(), sort_keys=True)
        groups = {}  # the entries of each distinct shape layout
        for entry in zoo:
            groups.setdefault(_layout(architecture, json.dumps(entry.head, sort_keys=True)), []).append(entry)
        if form != "state_dict" and len(groups) > 1:
            kinds = "; ".join(f"{len(g)} like {g[0].model_id} ({_describe(g[0].head)})" for g in groups.values())
            raise WeightDataError(
                f"form {form!r} needs models of one shape, the selection mixes {len(groups)} ({kinds}): "
                "select one head, e.g. zoo.filter(head='linear'), or use form='state_dict'"
            )
        self.form = form
        self.root = zoo.root
        # what an item reads, and no more: each checkpoint as its run record lists it (path, sha256, size)
        self.checkpoints: list[tuple[str, dict]] = [(e.model_id, e.checkpoint) for e in zoo]
        # the model's own key order and shapes; None when the selection mixes shapes (form "state_dict" only)
        self.shapes: dict[str, torch.Size] | None = None
        if len(groups) == 1:
            self.shapes = {key: torch.Size(shape) for key, shape in next(iter(groups))}
        self.spec: TokenSpec | None = None
        if form == "tokens":
            self.spec = spec or TokenSpec.from_model(_meta_model(zoo.architecture, zoo[0].head), width)
            self.spec.check_state_dict({k: torch.empty(s, device="meta") for k, s in self.shapes.items()})
        self.factors, self.vocabulary = _factor_table([e.factors for e in zoo])
        self.metrics = _metric_table([e.metrics for e in zoo])

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __getitem__(self, index: int) -> dict:
        model_id, checkpoint = self.checkpoints[index]
        state_dict = read_checkpoint(self.root, model_id, checkpoint)  # the one read of this item
        if self.form == "flat":
            weights = self.flatten(state_dict)
        elif self.form == "tokens":
            weights = tokenize(state_dict, self.spec, check_finite=False).values  # [T, d], as stored
        else:
            weights = state_dict
        return {
            "weights": weights,
            "factors": {name: values[index].clone() for name, values in self.factors.items()},
            "metrics": {name: values[index].clone() for name, values in self.metrics.items()},
            "model_id": model_id,
            "epoch": checkpoint["epoch"],
            "index": index,
        }

    @property
    def keys(self) -> list[str]:
        """The fixed key order of flat vectors: the model's own (models of one shape only)."""
        return list(self._one_shape())

    @property
    def num_params(self) -> int:
        """P, the length of a flat vector (models of one shape only)."""
        return sum(math.prod(shape) for shape in self._one_shape().values())

    def flatten(self, state_dict: StateDict) -> torch.Tensor:
        """The flat float32 vector [P] of a state dict, in `keys` order."""
        shapes = self._one_shape()
        if set(state_dict) != set(shapes):
            missing, extra = sorted(set(shapes) - set(state_dict)), sorted(set(state_dict) - set(shapes))
            raise WeightDataError(f"state dict does not fit the dataset: missing {missing[:5]}, unexpected {extra[:5]}")
        return torch.cat([state_dict[key].reshape(-1).float() for key in shapes])

    def unflatten(self, vector: torch.Tensor) -> StateDict:
        """The state dict of a flat vector [P], or of a batch [..., P] (tensors then lead with the batch axes)."""
        shapes = self._one_shape()
        if vector.shape[-1:] != (self.num_params,):
            raise WeightDataError(f"a flat vector has {self.num_params} values, got shape {list(vector.shape)}")
        lead = vector.shape[:-1]
        parts = vector.split([math.prod(shape) for shape in shapes.values()], dim=-1)
        return {key: part.reshape(*lead, *shape).clone() for (key, shape), part in zip(shapes.items(), parts)}

    def _one_shape(self) -> dict[str, torch.Size]:
        if self.shapes is None:
            raise WeightDataError("the selection mixes models of several shapes: there is no one flat layout")
        return self.shapes


@functools.cache
def _layout(architecture_json: str, head_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """((key, shape), ...) of the models of one architecture and head, in the model's own key order."""
    model = _meta_model(Architecture(**json.loads(architecture_json)), json.loads(head_json))
    return tuple((key, tuple(value.shape)) for key, value in model.state_dict().items())


def _meta_model(architecture: Architecture, head: dict) -> torch.nn.Module:
    with torch.device("meta"):  # structure only: no memory, no init
        return build_vit(architecture, head["num_classes"], head["head"], head["head_hidden"])


def _describe(head: dict) -> str:
    hidden = f" ({head['head_hidden']} hidden)" if head["head"] == "mlp" else ""
    return f"{head['head']} head{hidden}, {head['num_classes']} outputs"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _factor_table(factors: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """Each factor as a tensor [n] (see the module docstring), and the vocabulary of each categorical one."""
    table, vocabulary = {}, {}
    for name in sorted({name for f in factors for name in f}):
        values = [f.get(name) for f in factors]  # a factor a model lacks counts as None
        if any(_is_number(v) for v in values) and all(_is_number(v) or v is None for v in values):
            if all(isinstance(v, int) for v in values):
                table[name] = torch.tensor(values, dtype=torch.int64)
            else:
                table[name] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
            continue
        # categorical: codes into the distinct values, ordered by their JSON text (None, lists and bools included)
        texts = [json.dumps(v, sort_keys=True) for v in values]
        distinct = sorted(set(texts))
        vocabulary[name] = tuple(json.loads(text) for text in distinct)
        code = {text: i for i, text in enumerate(distinct)}
        table[name] = torch.tensor([code[text] for text in texts], dtype=torch.int64)
    return table, vocabulary


def _metric_table(metrics: list[dict]) -> dict[str, torch.Tensor]:
    """Each metric as a float32 tensor [n], NaN where a checkpoint does not record it (or records null)."""
    table = {}
    for name in sorted({name for m in metrics for name in m}):
        values = [m.get(name) for m in metrics]
        table[name] = torch.tensor([v if _is_number(v) else math.nan for v in values], dtype=torch.float32)
    return table
