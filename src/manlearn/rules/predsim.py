"""``predsim``: PredSim (Nøkland & Eidnes, ICML 2019), SPEC 2.4.

Each block's auxiliary network has two heads on the block output h: *pred* (average-pool h until
C·h'·w' fits a feature budget, flatten, Linear, CE) and *sim* (a 3x3 conv without bias, then the MSE
between the batch's similarity matrix and the labels' similarity matrix). Loss = β·sim + (1−β)·pred,
β = 0.99.

The similarity matrix depends on the whole batch: under data parallelism each rank's matrix sees only
its own shard, which is a different loss from the single-process one (the original code has the same
property; nothing here gathers across ranks).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import AuxContext, LocalBatch, Rule, register_rule

#: ``shared``: the ResNet adaptation of later papers, every parameter under the one optimiser of the run;
#: ``per-block``: the original code's own Adam per block, stepped inside the forward pass.
PREDSIM_OPTIMIZERS = ("shared", "per-block")


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    """Losses in float64 when the input is, else float32 (low precision is upcast, never downcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """PredSim's B×B similarity matrix: a B×C×H×W map is first reduced to the per-channel standard
    deviation over the positions (when C > 3 and H > 1, as the original code does; else flattened);
    each row is centred, divided by (1e-8 + its L2 norm), and S = clamp(X·Xᵀ, −1, 1)."""
    x = x.to(_loss_dtype(x))
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        x = x.flatten(2).std(dim=2)
    else:
        x = x.flatten(1)
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (xn @ xn.T).clamp(-1.0, 1.0)


def similarity_loss(features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """MSE between the features' and the targets' similarity matrices (targets: class indices, or
    per-class probabilities for mixup-style soft targets)."""
    onehot = targets if targets.is_floating_point() else F.one_hot(targets, num_classes)
    return F.mse_loss(similarity_matrix(features), similarity_matrix(onehot.to(_loss_dtype(features))))


def budget_pool(channels: int, height: int, width: int, budget: int) -> tuple[nn.Module, int]:
    """The original code's pooling of the *pred* head: kernel doubled alternately in height and width
    until C·h'·w' ≤ budget (or the kernel covers the map); returns the pool and C·h'·w'."""
    kh = kw = 1
    oh, ow = height, width
    while channels * oh * ow > budget and (kh < height or kw < width):
        if kh < height:
            kh *= 2
            oh = math.ceil(height / kh)
        if channels * oh * ow > budget and kw < width:
            kw *= 2
            ow = math.ceil(width / kw)
    if kh == 1 and kw == 1:
        return nn.Identity(), channels * oh * ow
    pad = ((kh * oh - height) // 2, (kw * ow - width) // 2)  # ceil-sized output, padding centred
    return nn.AvgPool2d((kh, kw), padding=pad), channels * oh * ow


class PredSimAux(nn.Module):
    """β·MSE(S(conv(h)), S(onehot y)) + (1−β)·CE(Linear(pool(h)), y)."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, feature_budget: int, beta: float) -> None:
        super().__init__()
        c, h, w = shape
        self.sim_conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.pool, features = budget_pool(c, h, w, feature_budget)
        self.pred = nn.Linear(features, num_classes)
        self.beta = float(beta)
        self.num_classes = num_classes

    def losses(self, h: torch.Tensor, batch: LocalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sim, pred) losses, unweighted."""
        sim = similarity_loss(self.sim_conv(h), batch.y, self.num_classes)
        logits = self.pred(self.pool(h).flatten(1))
        logits = logits.to(_loss_dtype(logits))
        y = batch.y.to(logits.dtype) if batch.y.is_floating_point() else batch.y
        pred = F.cross_entropy(logits, y)
        return sim, pred

    def forward(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        sim, pred = self.losses(h, batch)
        return self.beta * sim + (1.0 - self.beta) * pred


class PerBlockPredSimAux(PredSimAux):
    """The original code's variant: the block and this auxiliary network have their own Adam, stepped
    right after the block's backward (inside ``train_step``); their gradients are then cleared, so the
    run's optimiser (which still lists them) skips them and only trains the last piece and the head.

    The Adam state and step count travel in ``state_dict`` (checkpoints resume exactly). The learning
    rate is multiplied by ``lr_decay`` at each step count in ``lr_milestones`` (the original decays at
    epochs: give the matching step counts). Not for data parallelism (each rank would step on its own
    gradients: refused) nor an fp16 GradScaler (Adam would see scaled gradients).
    """

    def __init__(self, shape: tuple[int, int, int], num_classes: int, feature_budget: int, beta: float,
                 block: nn.Module, lr: float, lr_milestones: tuple[int, ...], lr_decay: float) -> None:
        super().__init__(shape, num_classes, feature_budget, beta)
        self._block = (block,)  # not a submodule: the block belongs to the backbone
        self.lr, self.lr_milestones, self.lr_decay = float(lr), tuple(int(m) for m in lr_milestones), float(lr_decay)
        self.steps = 0
        self._optimizer: torch.optim.Adam | None = None

    def trained_parameters(self) -> list[nn.Parameter]:
        """The block's parameters, then this auxiliary network's: what the block's own Adam steps."""
        return [p for p in (*self._block[0].parameters(), *self.parameters()) if p.requires_grad]

    @property
    def block_optimizer(self) -> torch.optim.Adam:
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(self.trained_parameters(), lr=self.lr)
        return self._optimizer

    def after_backward(self) -> None:
        """Step the block's own Adam, then clear the gradients it consumed."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError("predsim optimizer='per-block' steps each block's Adam inside the step, before any "
                              "gradient averaging: not available under data parallelism; use optimizer='shared'")
        self.block_optimizer.step()
        for p in self.trained_parameters():
            p.grad = None
        self.steps += 1
        if self.steps in self.lr_milestones:
            for group in self.block_optimizer.param_groups:
                group["lr"] *= self.lr_decay

    def get_extra_state(self) -> dict:
        return {"steps": self.steps, "optimizer": self.block_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.steps = int(state["steps"])
        # a copy: Optimizer.load_state_dict keeps tensors of matching dtype/device as they are, which would
        # share the moments with the learner the state came from
        self.block_optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))


@register_rule
class PredSimRule(Rule):
    """``predsim``: pred + sim heads per block, loss 0.99·sim + 0.01·pred (the ResNet adaptation:
    feature budget 512, one optimiser for everything)."""

    name = "predsim"
    fixed_input_size = True  # the pred head's pooling and Linear are sized for the build's maps
    summary = ("PredSim: 0.99 * similarity-matrix MSE + 0.01 * pooled linear CE per block "
               "(optimizer=shared | per-block: the original's own Adam per block)")

    def __init__(self, feature_budget: int = 512, beta: float = 0.99, optimizer: str = "shared",
                 block_lr: float = 5e-4, block_lr_milestones: tuple[int, ...] = (), block_lr_decay: float = 0.25) -> None:
        """``optimizer="per-block"``: the original code's own Adam per block (``block_lr``, decayed by
        ``block_lr_decay`` at the step counts ``block_lr_milestones``), stepped inside the step; the run's
        optimiser then trains only the last piece and the head (the original recipe: Adam, lr 5e-4)."""
        if optimizer not in PREDSIM_OPTIMIZERS:
            raise ConfigError(f"unknown predsim optimizer {optimizer!r}; choose from {PREDSIM_OPTIMIZERS}")
        if not float(block_lr) > 0:
            raise ConfigError(f"predsim block_lr must be positive, got {block_lr!r}")
        self.block_lr, self.block_lr_decay = float(block_lr), float(block_lr_decay)
        self.block_lr_milestones = tuple(int(m) for m in block_lr_milestones)
        if isinstance(feature_budget, bool) or not isinstance(feature_budget, int) or feature_budget < 1:
            raise ConfigError(f"predsim feature_budget must be a positive integer, got {feature_budget!r}")
        if not 0.0 <= float(beta) <= 1.0:
            raise ConfigError(f"predsim beta must be in [0, 1], got {beta!r}")
        self.feature_budget, self.beta, self.optimizer = feature_budget, float(beta), optimizer

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        shape = tuple(h_shape or ctx.h_shape)
        ctx.require_feature_maps("predsim", shape, "needs feature maps")
        ctx.require_labels(self.name)
        if self.optimizer == "per-block":
            if len(ctx.blocks) != ctx.index + 1:
                raise ConfigError("predsim optimizer='per-block' needs the learner's blocks in its AuxContext")
            return PerBlockPredSimAux(shape, ctx.num_classes, self.feature_budget, self.beta, ctx.blocks[ctx.index],
                                      self.block_lr, self.block_lr_milestones, self.block_lr_decay)
        return PredSimAux(shape, ctx.num_classes, self.feature_budget, self.beta)
