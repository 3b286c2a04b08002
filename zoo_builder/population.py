"""Population training: many same-shaped ViTs trained together with `torch.func`.

The parameters of m models are stacked ([m, ...] per tensor) and one `vmap(grad(...))` call computes
every model's gradients on its own batch; `PopulationOptimizer` applies every model's own AdamW/SGD
step with its own learning rate and weight decay. Each model has its own seed, data order, augmentation,
label smoothing, loss (cross-entropy or timm's soft-target cross-entropy), Mixup/CutMix, random erasing and
SimCLR colour distortions (see `augment`): a model with these off trains exactly as it would without them.
`mode="loop"` trains the same models one by one with `nn.Module`s and `torch.optim` on exactly the same
batches: the reference the population path is tested against.

On the CPU a model's training does not depend on the population it sits in (tested bit for bit): vmap's
batching rules give the same floats for every population size but one (a single model takes other kernels,
e.g. for the patch convolution's weight gradient), so a population of one is trained beside an identical
twin whose results are dropped. A sharded build therefore equals the unsharded one byte for byte on the CPU.
Nothing here makes the same promise on a GPU, where matmul kernels are chosen by shape.

Shapes: m models, b batch, k outputs, C/H/W image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch.func import functional_call, grad_and_value, vmap

from vitzoo.errors import ConfigError
from vitzoo.zoo_builder.augment import (
    affine_params,
    augment,
    colour_transform,
    distort_colours,
    epoch_generator,
    mix_and_erase,
)
from vitzoo.zoo_builder.blueprint import Factors
from vitzoo.zoo_builder.data import StoredImages, load_split, resize_for, take
from vitzoo.zoo_builder.data import info as dataset_info
from vitzoo.zoo_builder.models import Architecture, autocast, build_vit, check_precision
from vitzoo.zoo_builder.optim import PopulationOptimizer, torch_optimizer
from vitzoo.zoo_builder.pool import PoolPlan, pool_plan, pooled_batches

# factors that must agree inside one population (they fix shapes, the data or the optimizer's code path)
STACK_FACTORS = (
    "objective",
    "optimizer",
    "batch_size",
    "epochs",
    "head",
    "head_hidden",
    "dropout",
    "drop_path",
    "projection_dim",
    "dataset",
    "classes",
    "train_subset",
)
EVAL_BATCH = 500
# images x models one vmapped evaluation forward holds at most: activations grow with both (the demo fine-tunes
# ~500 models at once; 500 images each took 5.5 GB)
EVAL_IMAGES_PER_STEP = 16_384


def stack_key(factors: Factors) -> tuple:
    return tuple(repr(getattr(factors, name)) for name in STACK_FACTORS)


@dataclass
class EpochMetrics:
    """Per-model metrics of one epoch, as python lists of length m."""

    values: dict[str, list[float]]


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with label smoothing given as a tensor (so it can differ per model under vmap)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)  # [b, k]
    nll = -log_probs.gather(-1, labels[:, None]).squeeze(-1)
    uniform = -log_probs.mean(dim=-1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's NT-Xent over two views [b, k]: loss, and the number of views whose positive is top-1."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # [2b, k]
    similarity = z @ z.T / temperature
    similarity = similarity - 1e9 * torch.eye(2 * b, device=z.device)  # never match a view to itself
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    loss = F.cross_entropy(similarity, targets)
    correct = (similarity.argmax(dim=-1) == targets).sum()
    return loss, correct


class PopulationTrainer:
    """Trains m models that share every factor in `STACK_FACTORS` (see module docstring)."""

    def __init__(
        self,
        factors: list[Factors],
        init_states: list[dict[str, torch.Tensor]],
        architecture: Architecture,
        device: torch.device,
        mode: str = "vmap",
        precision: str = "fp32",
        data_root: str | None = None,
    ):
        if mode not in ("vmap", "loop"):
            raise ConfigError(f"mode must be vmap or loop, got {mode!r}")
        check_precision(precision)
        keys = {stack_key(f) for f in factors}
        if len(keys) != 1:
            raise ValueError("a population needs models that agree on " + ", ".join(STACK_FACTORS))
        self.factors = factors
        self.shared = factors[0]
        self.m = len(factors)
        if mode == "vmap" and self.m == 1:  # see the module docstring: a lone model trains beside its twin
            factors, init_states = factors * 2, init_states * 2
        self.rows = len(factors)  # stacked models: m, or 2 for the twin
        self.device = device
        self.mode = mode
        self.precision = precision
        self.contrastive = self.shared.objective == "contrastive"
        self.data_root = data_root
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        meta = dataset_info(self.shared.dataset)
        self.image_size = architecture.kwargs.get("img_size", meta.image_size)
        self.hflip = meta.hflip
        self.mean, self.std = meta.mean, meta.std
        self.num_outputs = self.shared.num_outputs

        def make_model():
            model = build_vit(
                architecture,
                self.num_outputs,
                self.shared.head,
                self.shared.head_hidden,
                self.shared.dropout,
                self.shared.drop_path,
            ).to(device)
            # vmap has no batching rule for the fused attention kernel: the unfused math path is faster here
            for module in model.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = False
            return model

        per_model = lambda name: torch.tensor([float(getattr(f, name)) for f in factors], device=device)
        self.lr = per_model("lr")
        self.weight_decay = per_model("weight_decay")
        self.smoothing = per_model("label_smoothing")
        self.temperature = per_model("temperature")
        # [m]: models whose images are moved (affine)
        self.augmented = torch.tensor([f.augment > 0 or f.rotation > 0 or bool(f.hflip) for f in factors])
        self.row_factors = factors  # one per stacked row (the twin included)
        self.colours = [
            colour_transform(
                f.jitter_brightness,
                f.jitter_contrast,
                f.jitter_saturation,
                f.jitter_hue,
                f.jitter_prob,
                f.grayscale_prob,
                f.blur_kernel,
            )
            for f in factors
        ]  # per row: SimCLR's colour distortions, None when off
        # per row: timm's soft-target loss (a tensor, so vmap can pick it per model); when no row takes it, the
        # supervised loss is computed as it always was
        self.soft_targets = torch.tensor([f.loss == "soft_target" for f in factors], device=device)
        self.mixes = [f.loss == "soft_target" or f.random_erasing > 0 for f in factors]  # rows through mix_and_erase
        self.soft_target_loss = SoftTargetCrossEntropy()
        self.active = torch.ones(self.rows, dtype=torch.bool, device=device)

        if mode == "vmap":
            self.template = make_model()
            names = [name for name, _ in self.template.named_parameters()]
            self.params = {
                name: torch.stack([s[name].float() for s in init_states]).to(device).contiguous() for name in names
            }
            self.optimizer = PopulationOptimizer(self.shared.optimizer, self.lr, self.weight_decay)
        else:
            self.models = []
            self.optimizers = []
            for f, state in zip(factors, init_states):
                model = make_model()
                model.load_state_dict(state)
                self.models.append(model)
                self.optimizers.append(torch_optimizer(f.optimizer, model.parameters(), f.lr, f.weight_decay))

    # ------------------------------------------------------------------------------------------ data

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split of the population's dataset, on the training device (copied there once)."""
        if split not in self._splits:
            images, labels = load_split(self.shared.dataset, split, self.data_root, self.shared.classes)
            if split == "train" and self.shared.train_subset:
                subset = slice(0, self.shared.train_subset)
                images, labels = take(images, subset), labels[subset]
            self._splits[split] = (images.to(self.device), labels.to(self.device))
        return self._splits[split]

    def _epoch_plan(self, epoch: int, n: int, pooled: bool = False):
        """Per-model data order [m, steps, b] (a `PoolPlan` when `pooled`: images read from disk, see pool.py),
        augmentation matrices [m, steps, b, 2, 3] (x2 views) and the seeds [m, steps, 3] of the global-generator
        transforms (colours of view 1 and 2, mixing and erasing)."""
        b = self.shared.batch_size
        steps = n // b
        if steps == 0:
            raise ConfigError(f"batch_size {b} exceeds the {n} training images of {self.shared.dataset}")
        orders, thetas, thetas2, seeds = [], [], [], []
        for f in self.row_factors:
            if not pooled:
                order = torch.randperm(n, generator=epoch_generator(f.seed, epoch, 0))[: steps * b]
                orders.append(order.view(steps, b))
            moves = dict(flip_prob=f.hflip, rotation=f.rotation)
            thetas.append(affine_params(steps * b, f.augment, self.hflip, epoch_generator(f.seed, epoch, 1), **moves))
            if self.contrastive:
                generator = epoch_generator(f.seed, epoch, 2)
                thetas2.append(affine_params(steps * b, f.augment, self.hflip, generator, **moves))
            seeds.append(torch.randint(2**31 - 1, (steps, 3), generator=epoch_generator(f.seed, epoch, 3)))
        order = pool_plan(n, b, [f.seed for f in self.row_factors], epoch) if pooled else torch.stack(orders)
        theta = torch.stack(thetas).view(self.rows, steps, b, 2, 3)
        theta2 = torch.stack(thetas2).view(self.rows, steps, b, 2, 3) if self.contrastive else None
        return steps, order, theta, theta2, torch.stack(seeds)

    def _autocast(self):
        return autocast(self.device, self.precision)

    # ---------------------------------------------------------------------------------------- losses

    def _loss(self, forward, x, y, soft, smoothing, soft_target, temperature):
        """Loss and number of correct predictions of one model. x: [b, C, H, W] or [2, b, C, H, W] (views);
        y: labels [b]; soft: soft targets [b, k] or None; soft_target: whether this model's loss takes them."""
        with self._autocast():
            if self.contrastive:
                z = forward(x.flatten(0, 1))  # [2b, k]
                loss, correct = info_nce(*z.float().chunk(2), temperature)
            else:
                logits = forward(x)
                loss = smoothed_cross_entropy(logits, y, smoothing)
                if soft is not None:  # torch.where: the branch not taken gets an exactly-zero gradient
                    loss = torch.where(soft_target, self.soft_target_loss(logits.float(), soft), loss)
                correct = (logits.argmax(dim=-1) == y).sum()
        return loss, correct

    def _batches(self, images, labels, order, steps: int):
        """Every step's images x [m, b, C, H, W] (normalised, not augmented) and labels y [m, b]. Images on disk
        come from one shared pool per few steps, read ahead of training (`order` is then a `PoolPlan`)."""
        if isinstance(order, PoolPlan):
            yield from pooled_batches(images, labels, order)
            return
        for step in range(steps):
            index = order[:, step].to(self.device)  # [m, b]
            yield images[index], labels[index]

    def _view(self, x, theta, seeds):
        """One view of every model's images x [m, b, C, H, W]: moved, at the model's input size, colours distorted."""
        view = resize_for(augment(x, theta, self.augmented), self.image_size)
        if all(colour is None for colour in self.colours):
            return view
        rows = [
            view[i] if colour is None else distort_colours(view[i], colour, self.mean, self.std, int(seeds[i]))
            for i, colour in enumerate(self.colours)
        ]
        return torch.stack(rows)

    def _mix(self, x, y, seeds):
        """Every model's images x [m, b, C, H, W] through its Mixup/CutMix and erasing; soft targets [m, b, k]."""
        images, targets = [], []
        for i, (f, mixes) in enumerate(zip(self.row_factors, self.mixes)):
            if mixes:
                args = (f.mixup, f.cutmix, f.label_smoothing, f.random_erasing, int(seeds[i]))
                mixed, soft = mix_and_erase(x[i], y[i], self.num_outputs, *args)
            else:  # a cross-entropy model: its images untouched, its soft targets unused (torch.where in _loss)
                mixed, soft = x[i], F.one_hot(y[i], self.num_outputs).float()
            images.append(mixed)
            targets.append(soft)
        return torch.stack(images), torch.stack(targets)

    def _augmented(self, x, y, theta, theta2, seeds, step):
        """Every model's batch at `step` from its images x [m, b, C, H, W] and labels y [m, b]: the views
        [m, b, C, H, W] (or [m, 2, b, ...]), y, and the soft targets [m, b, k] (None when no model takes them)."""
        view1 = self._view(x, theta[:, step], seeds[:, step, 0])
        if not self.contrastive:
            if not any(self.mixes):
                return view1, y, None
            view1, soft = self._mix(view1, y, seeds[:, step, 2])
            return view1, y, soft
        view2 = self._view(x, theta2[:, step], seeds[:, step, 1])
        return torch.stack([view1, view2], dim=1), y, None

    # -------------------------------------------------------------------------------------- training

    def train_epoch(self, epoch: int, progress=None) -> EpochMetrics:
        """One epoch for every model; returns train loss and accuracy (averaged over the epoch's batches)."""
        images, labels = self.split("train")
        steps, order, theta, theta2, seeds = self._epoch_plan(epoch, len(labels), isinstance(images, StoredImages))
        loss_sum = torch.zeros(self.rows, device=self.device)
        correct_sum = torch.zeros(self.rows, device=self.device)
        for step, (x, y) in enumerate(self._batches(images, labels, order, steps)):
            losses, correct = self._train_step(*self._augmented(x, y, theta, theta2, seeds, step))
            finite = torch.isfinite(losses)
            self.active &= finite
            loss_sum += torch.where(finite, losses, torch.nan).detach()
            correct_sum += correct.float()
            if progress is not None:
                progress.update(1)
        seen = steps * self.shared.batch_size * (2 if self.contrastive else 1)
        return EpochMetrics(
            {"train_loss": (loss_sum / steps)[: self.m].tolist(), "train_acc": (correct_sum / seen)[: self.m].tolist()}
        )

    def _train_step(
        self, x: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "vmap":

            def model_loss(params, x, y, soft, smoothing, soft_target, temperature):
                forward = lambda inputs: functional_call(self.template, params, (inputs,))
                return self._loss(forward, x, y, soft, smoothing, soft_target, temperature)

            self.template.train()
            in_dims = (0, 0, 0, None if soft is None else 0, 0, 0, 0)  # vmap takes no None under a batched dim
            grad_fn = vmap(grad_and_value(model_loss, has_aux=True), in_dims=in_dims, randomness="different")
            per_model = (self.smoothing, self.soft_targets, self.temperature)
            grads, (losses, correct) = grad_fn(self.params, x, y, soft, *per_model)
            self.optimizer.step(self.params, grads, self.active & torch.isfinite(losses))
            return losses.detach(), correct
        losses, corrects = [], []
        for i, (model, optimizer) in enumerate(zip(self.models, self.optimizers)):
            model.train()
            soft_i = None if soft is None else soft[i]
            per_model = (self.smoothing[i], self.soft_targets[i], self.temperature[i])
            loss, correct = self._loss(model, x[i], y[i], soft_i, *per_model)
            if self.active[i] and torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            losses.append(loss.detach())
            corrects.append(correct)
        return torch.stack(losses), torch.stack(corrects)

    # ------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, split: str) -> EpochMetrics:
        """Loss and accuracy of every model on a split, in eval mode. Contrastive models are scored by
        InfoNCE on fixed augmented pairs (accuracy: the share of views whose positive ranks first)."""
        images, labels = self.split(split)
        n = len(labels)
        batch = (
            self.shared.batch_size if self.contrastive else max(1, min(EVAL_BATCH, EVAL_IMAGES_PER_STEP // self.rows))
        )
        loss_sum = torch.zeros(self.rows, device=self.device)
        correct_sum = torch.zeros(self.rows, device=self.device)
        counted = 0
        for start in range(0, n - (n % batch if self.contrastive else 0), batch):
            x, y = images[start : start + batch], labels[start : start + batch]
            if self.contrastive:
                g1, g2 = epoch_generator(0, start, 1), epoch_generator(0, start, 2)
                theta1 = affine_params(len(y), 1.0, self.hflip, g1)[None]
                theta2 = affine_params(len(y), 1.0, self.hflip, g2)[None]
                one = torch.ones(1, dtype=torch.bool)
                x = torch.stack([augment(x[None], theta1, one)[0], augment(x[None], theta2, one)[0]])  # [2, b, ...]
            x = resize_for(x, self.image_size)
            losses, correct = self._eval_batch(x, y)
            loss_sum += losses * len(y)
            correct_sum += correct.float()
            counted += len(y)
        views = 2 if self.contrastive else 1
        return EpochMetrics(
            {
                f"{split}_loss": (loss_sum / counted)[: self.m].tolist(),
                f"{split}_acc": (correct_sum / (counted * views))[: self.m].tolist(),
            }
        )

    def _eval_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = torch.zeros((), device=self.device)
        if self.mode == "vmap":
            self.template.eval()

            def model_loss(params, temperature):
                forward = lambda inputs: functional_call(self.template, params, (inputs,))
                return self._loss(forward, x, y, None, zero, None, temperature)

            return vmap(model_loss)(self.params, self.temperature)
        results = []
        for i, model in enumerate(self.models):
            model.eval()
            results.append(self._loss(model, x, y, None, zero, None, self.temperature[i]))
        return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])

    # ---------------------------------------------------------------------------------- state access

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every model's weights (timm key names), on the CPU."""
        if self.mode == "vmap":
            return [{name: p[i].detach().cpu().clone() for name, p in self.params.items()} for i in range(self.m)]
        return [{k: v.detach().cpu().clone() for k, v in model.state_dict().items()} for model in self.models]

    def resume_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue training bit-for-bit (weights, optimizer state, divergence flags),
        copied to the CPU."""
        state = {"active": self.active.cpu().clone()}
        if self.mode == "vmap":
            state.update({f"params.{k}": v.cpu().clone() for k, v in self.params.items()})
            state.update({f"optim.{k}": v.cpu().clone() for k, v in self.optimizer.state_dict().items()})
            return state
        for i, (model, optimizer) in enumerate(zip(self.models, self.optimizers)):
            state.update({f"model{i}.{k}": v.cpu().clone() for k, v in model.state_dict().items()})
            for p_index, p_state in optimizer.state_dict()["state"].items():
                for key, value in p_state.items():
                    state[f"optim{i}.{p_index}.{key}"] = torch.as_tensor(value).cpu().clone()
        return state

    def load_resume_state(self, state: dict[str, torch.Tensor]) -> None:
        self.active = state["active"].to(self.device)
        if self.mode == "vmap":
            for k in self.params:
                self.params[k].copy_(state[f"params.{k}"])
            self.optimizer.load_state_dict(
                {k[len("optim.") :]: v.to(self.device) for k, v in state.items() if k.startswith("optim.")}
            )
            return
        for i, (model, optimizer) in enumerate(zip(self.models, self.optimizers)):
            prefix = f"model{i}."
            model.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            saved = optimizer.state_dict()
            prefix = f"optim{i}."
            for key, value in state.items():
                if key.startswith(prefix):
                    p_index, name = key[len(prefix) :].split(".", 1)
                    saved["state"].setdefault(int(p_index), {})[name] = value.to(self.device)
            optimizer.load_state_dict(saved)
