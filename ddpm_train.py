"""The training step and what measures it: one AdamW step on the diffusion loss with the EMA update, the
learning-rate schedule, the evaluation loss, and the clock that keeps the time budget.

ddpm_main.py's training loop is made of these, and bench/bench.py times the very same step.
"""
import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ddpm_diffusion import Diffusion
from ddpm_helpers import Denoiser, all_ranks_mean

EVAL_SEED = 1234  # fixed t and noise for validation / test losses, comparable across epochs
GRAD_CLIP_NORM = 1.0  # as in Ho et al.'s training


def learning_rate(config, step, progress):
    """config's lr after a linear warm-up over warmup_steps, then constant or cosine-decayed (lr_decay) with
    progress ∈ [0, 1]."""
    warmup = min(1.0, (step + 1) / max(1, config["warmup_steps"]))
    decay = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) if config["lr_decay"] == "cosine" else 1.0
    return config["lr"] * warmup * decay


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """θ_ema ← decay · θ_ema + (1 − decay) · θ."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)


@dataclass(eq=False)
class TrainingStep:
    """One optimizer step: the diffusion loss (eq. 14) on a batch, AdamW with the gradient norm clipped, then
    the EMA update (decay warmed up as min(ema_decay, (1 + step) / (10 + step))).

    t, the label drops and ε are drawn for the global batch (world_size · B) and sliced to this rank's
    images: any number of ranks trains on the randomness of one process with the global batch."""
    model: nn.Module           # the weights AdamW moves
    ema_model: nn.Module       # their moving average, used for evaluation and sampling
    optimizer: torch.optim.Optimizer
    diffusion: Diffusion
    denoiser: Denoiser         # how the training forward runs: DDP-wrapped, compiled, bf16 as the run asks
    p_uncond: float            # probability a label is dropped to the null label (classifier-free guidance)
    loss_type: str             # 'l1', 'l2' or 'huber'
    ema_decay: float
    rank: int = 0
    world_size: int = 1

    def __call__(self, x, y, step, lr):
        """Images x (B, 3, H, W), labels y (B,); returns the loss as a device tensor, so the caller decides
        when to synchronise with the host."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n, mine = len(x) * self.world_size, slice(self.rank, None, self.world_size)
        t = torch.randint(0, self.diffusion.timesteps, (n,), device=x.device)[mine]
        labels = None
        if self.denoiser.num_classes is not None:  # classifier-free guidance: drop labels to the null label
            labels = torch.where(torch.rand(n, device=x.device)[mine] < self.p_uncond,
                                 torch.full_like(y, self.denoiser.num_classes), y)
        noise = torch.randn((n, *x.shape[1:]), device=x.device)[mine]
        loss = self.diffusion.p_losses(self.denoiser, x, t, noise, loss_type=self.loss_type, class_labels=labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM)
        self.optimizer.step()
        update_ema(self.ema_model, self.model, min(self.ema_decay, (1 + step) / (10 + step)))
        return loss.detach()


@torch.no_grad()
def evaluate_loss(diffusion, denoiser, loader, conditional, loss_type):
    """Mean loss over a split with t and ε drawn from a fixed seed: comparable between epochs.
    Under torchrun each rank takes its shard, and t, ε are drawn for the global batch and sliced, so
    the value equals a single process's with the same global batch."""
    g = torch.Generator().manual_seed(EVAL_SEED)
    rank, world = loader.rank, loader.world_size
    total = torch.zeros((), device=loader.device)
    for x, y in loader.batches():
        n = len(x) * world
        t = torch.randint(0, diffusion.timesteps, (n,), generator=g)[rank::world].to(x.device)
        noise = torch.randn((n, *x.shape[1:]), generator=g)[rank::world].to(x.device)
        loss = diffusion.p_losses(denoiser, x, t, noise, loss_type, y if conditional else None)
        total += loss * len(x)
    return (all_ranks_mean(total, world) / loader.num_local).item()  # Σ losses / images, over all ranks


class TrainingClock:
    """Where training time goes, and how much of the time budget (minutes; None: none) the steps have used.

    timing is the TrainingState's dict (decode_s, compile_s, train_s, eval_s, sample_s; fid_s at the end), so
    it survives a resume. With compiles=True (torch.compile on CUDA), a step that meets a new batch size
    compiles, and is timed apart as compile_s: the budget counts training steps only."""

    def __init__(self, timing, budget_min, compiles):
        self.timing, self.budget_min, self.compiles = timing, budget_min, compiles
        self.compiled_batch_sizes = set()
        self.agreed_progress = self.spent()  # the budget fraction all ranks last agreed on (the lr follows it)
        self.epoch_start, self.untimed = time.perf_counter(), 0.0

    def start_epoch(self):
        self.epoch_start, self.untimed = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def step(self, batch_size):
        """Times a training step; one that compiles a new batch size counts as compile time, not training."""
        new_shape = self.compiles and batch_size not in self.compiled_batch_sizes
        if new_shape:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if new_shape:
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            self.untimed += seconds
            self.timing["compile_s"] += seconds
            self.compiled_batch_sizes.add(batch_size)

    def epoch_seconds(self):
        """Training seconds of the current epoch so far (compiling steps excluded)."""
        return time.perf_counter() - self.epoch_start - self.untimed

    def end_epoch(self):
        """Adds the epoch's training seconds to train_s and returns them."""
        seconds = self.epoch_seconds()
        self.timing["train_s"] += seconds
        return seconds

    def spent(self, running_epoch_s=0.0):
        """The fraction of the budget that training steps have used (0 without a budget)."""
        if not self.budget_min:
            return 0.0
        return (self.timing["train_s"] + running_epoch_s) / (self.budget_min * 60)

    def out_of_time(self, running_epoch_s=0.0):
        return self.spent(running_epoch_s) >= 1

    def minutes_left(self, running_epoch_s=0.0):
        """Minutes of the budget left (None without a budget)."""
        return max(0.0, self.budget_min * (1 - self.spent(running_epoch_s))) if self.budget_min else None

    @contextlib.contextmanager
    def timed(self, key):
        """Adds the block's seconds to timing[key]."""
        start = time.perf_counter()
        yield
        self.timing[key] = self.timing.get(key, 0.0) + time.perf_counter() - start
