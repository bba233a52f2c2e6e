"""The training step and what measures and reports it: one AdamW step on the diffusion loss (accumulated over
micro-batches, loss-scaled in fp16) with the EMA update, the learning-rate schedule, the evaluation loss, the clock
that keeps the time budget, and the Reporter (the banner, bars, log lines, TensorBoard).

The training run (ddpm_train.py) is made of these, and bench/bench.py times the very same step.
"""
import contextlib
import itertools
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm_data import describe_data, trained_data
from ddpm_diffusion import Diffusion, SamplerSettings
from ddpm_helpers import stderr_is_terminal
from ddpm_pictures import tile
from ddpm_runtime import Denoiser, all_ranks_mean, describe_precision, synchronize
from ddpm_sample import describe_sampling

EVAL_IMAGES = 1000  # the validation and test losses are over this many images of each split, evenly spread
EVAL_SEED = 1234  # fixed t and noise for validation / test losses, comparable across epochs
GRAD_CLIP_NORM = 1.0  # as in Ho et al.'s training
FP16_INIT_SCALE = 2.0 ** 16  # the loss scale fp16 training starts from (GradScaler's default)
LOG_LINE_SECONDS = 60  # without a terminal, the least time between two training log lines
WALL_PARTS = ("decode_s", "compile_s", "train_s", "eval_s", "sample_s")  # the timed parts of a run's wall time


def learning_rate(config, step, progress):
    """config's lr after a linear warm-up over warmup_steps, then constant or cosine-decayed (lr_decay) with
    progress ∈ [0, 1]."""
    warmup = min(1.0, (step + 1) / max(1, config["warmup_steps"]))
    decay = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) if config["lr_decay"] == "cosine" else 1.0
    return config["lr"] * warmup * decay


def build_optimizer(model, lr, weight_decay=0.01):
    """AdamW (Adam when weight_decay is 0) with its fused kernel, on the CPU too (about 10 % faster in float32)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def build_loss_scaler(precision, device):
    """fp16's dynamic loss scaler (from 2¹⁶, halved on overflow, doubled after 2,000 clean steps); None otherwise."""
    return torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE) if precision == "fp16" else None


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """θ_ema ← decay · θ_ema + (1 − decay) · θ."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)


@dataclass(eq=False)
class TrainingStep:
    """One optimizer step: the diffusion loss (eq. 14) on a batch, accumulated over grad_accum micro-batches, AdamW
    with the gradient norm clipped, then the EMA update (decay warmed up as min(ema_decay, (1 + step) / (10 + step))).

    t, the label drops and ε are drawn for the global batch (world_size · B) and sliced to this rank's
    images, then cut into micro-batches: any number of ranks and micro-batches trains on the randomness, and
    computes the loss and gradient, of one process with the global batch. Under DDP the gradients are all-reduced
    once per step, on the last micro-batch (no_sync before it).

    fp16 (scaler given): the loss is scaled before the backward pass; a step whose scaled gradients overflow is
    skipped by the scaler, which lowers the scale, and reported in the returned flag."""
    model: nn.Module           # the weights AdamW moves
    ema_model: nn.Module       # their moving average, used for evaluation and sampling
    optimizer: torch.optim.Optimizer
    diffusion: Diffusion
    denoiser: Denoiser         # how the training forward runs: DDP-wrapped, compiled, under autocast as the run asks
    p_uncond: float            # probability a label is dropped to the null label (classifier-free guidance)
    loss_type: str             # 'l1', 'l2' or 'huber'
    ema_decay: float
    rank: int = 0
    world_size: int = 1
    grad_accum: int = 1        # micro-batches per optimizer step
    scaler: torch.amp.GradScaler = None  # fp16's dynamic loss scaler; None: bf16 and fp32 need none

    def __call__(self, x, y, step, lr):
        """Images x (B, C, H, W), labels y (B,) of grad_accum micro-batches → (mean loss, 1.0 when the scaler skipped
        the step, else 0.0) as device tensors: the caller decides when to synchronise."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t, labels, noise = self.draw_randomness(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        micro = -(-len(x) // self.grad_accum)  # ⌈B / grad_accum⌉ images per micro-batch
        chunks = list(zip(x.split(micro), t.split(micro), noise.split(micro),
                          labels.split(micro) if labels is not None else itertools.repeat(None)))
        parts = []
        for i, (x_i, t_i, noise_i, labels_i) in enumerate(chunks):
            with self.gradient_sync(i == len(chunks) - 1):
                part = self.diffusion.p_losses(self.denoiser, x_i, t_i, noise_i, self.loss_type, labels_i)
                if len(chunks) > 1:  # the micro-batch's share of the batch mean, so the gradients add up to its
                    part = part * (len(x_i) / len(x))
                (self.scaler.scale(part) if self.scaler else part).backward()
            parts.append(part.detach())
        skipped = self.optimizer_step()
        update_ema(self.ema_model, self.model, min(self.ema_decay, (1 + step) / (10 + step)))
        return (parts[0] if len(parts) == 1 else torch.stack(parts).sum()), skipped

    def draw_randomness(self, x, y):
        """t (B,), the labels after the guidance drops (B,) or None, and ε like x: drawn for the global batch and
        sliced to this rank's images."""
        n, mine = len(x) * self.world_size, slice(self.rank, None, self.world_size)
        t = torch.randint(0, self.diffusion.timesteps, (n,), device=x.device)[mine]
        labels = None
        if self.denoiser.num_classes is not None:  # classifier-free guidance: drop labels to the null label
            labels = torch.where(torch.rand(n, device=x.device)[mine] < self.p_uncond,
                                 torch.full_like(y, self.denoiser.num_classes), y)
        noise = torch.randn((n, *x.shape[1:]), device=x.device)[mine]
        return t, labels, noise

    def gradient_sync(self, last):
        """Under DDP, no gradient all-reduce before the last micro-batch of a step (no_sync); else nothing."""
        no_sync = getattr(self.denoiser.model, "no_sync", None)
        return no_sync() if no_sync is not None and not last else contextlib.nullcontext()

    def optimizer_step(self):
        """Clip the gradient norm, step AdamW (through the scaler in fp16); 1.0 when the scaler skipped it, else 0.0."""
        if self.scaler is None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM)
            self.optimizer.step()
            return torch.zeros((), device=norm.device)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM)
        self.scaler.step(self.optimizer)  # skipped when the unscaled gradients hold inf or NaN
        self.scaler.update()
        return (~torch.isfinite(norm)).float()  # the norm is finite exactly when every gradient is


@torch.no_grad()
def evaluate_loss(diffusion, denoiser, loader, conditional, loss_type):
    """Mean loss over a split with t and ε from a fixed seed, drawn for the global batch and sliced to this rank's
    shard: comparable between epochs, equal to one process's."""
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
    """The run's wall clock against its time budget (minutes; None: none), and where the time goes.

    The budget covers the whole run, a resumed run's earlier wall time (timing['wall_s']) included. Training stops
    when what is left would only cover the end-of-run work (reserve_s), where the lr's cosine decay ends. timing is
    the TrainingState's dict, so it survives a resume; with compiles, a step meeting a new batch size is timed apart
    as compile_s, the device's queue drained before and after it."""

    def __init__(self, timing, budget_min, compiles, device=torch.device("cpu"), started=None):
        self.timing, self.budget_min, self.compiles, self.device = timing, budget_min, compiles, device
        self.started = time.perf_counter() if started is None else started  # this session's start
        self.used_before = self.wall_used(timing)  # wall time of the sessions before this one
        self.compiled_batch_sizes = set()
        self.reserve_s = 0.0             # the end-of-run work's estimated seconds (keep_back)
        self.session_images, self.session_train_s = 0, 0.0  # this session's trained images and their seconds
        self.eval_rate = None            # measured seconds per image of a no-grad forward (None: not yet)
        self.save_s = 0.0                # seconds the last checkpoint write took
        self.last_save = time.perf_counter()  # when the last checkpoint was written (or the run started)
        self.agreed_progress = self.progress()  # the lr's progress all ranks last agreed on
        self.epoch_start, self.untimed = None, 0.0  # epoch_start: None between epochs

    @staticmethod
    def wall_used(timing):
        """The wall seconds a run's timing says it used (older checkpoints kept no wall_s: their parts' sum)."""
        return timing.get("wall_s") or sum(timing.get(key, 0.0) for key in WALL_PARTS)

    def keep_back(self, seconds):
        """The end-of-run work's estimated seconds, kept back from training's share of the budget."""
        self.reserve_s = seconds

    def agree_on_progress(self, progress):
        """The lr's progress as all ranks agreed on it (ddpm_train.agree_on_stop_and_checkpoint)."""
        self.agreed_progress = progress

    def saved(self, start):
        """A checkpoint whose write began at `start` is on the disk."""
        self.last_save = time.perf_counter()
        self.save_s = self.last_save - start

    def checkpoint_due(self, minutes):
        """Whether `minutes` have passed since the last checkpoint (--checkpoint_minutes)."""
        return time.perf_counter() - self.last_save >= minutes * 60

    def start_epoch(self):
        self.epoch_start, self.untimed = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def step(self, batch_size):
        """Times a training step; one that compiles a new batch size counts as compile time, not training."""
        new_shape = self.compiles and batch_size not in self.compiled_batch_sizes
        if new_shape:
            synchronize(self.device)
        start = time.perf_counter()
        yield
        if new_shape:
            synchronize(self.device)
            seconds = time.perf_counter() - start
            self.untimed += seconds
            self.timing["compile_s"] += seconds
            self.compiled_batch_sizes.add(batch_size)
        else:
            self.session_images += batch_size

    def epoch_seconds(self):
        """Training seconds of the current epoch so far (compiling steps excluded; 0 between epochs)."""
        return time.perf_counter() - self.epoch_start - self.untimed if self.epoch_start is not None else 0.0

    def end_epoch(self):
        """Adds the epoch's training seconds to train_s and returns them."""
        seconds = self.epoch_seconds()
        self.epoch_start = None
        self.timing["train_s"] += seconds
        self.session_train_s += seconds
        return seconds

    def used_s(self):
        """Wall seconds the run has used, earlier sessions included."""
        return self.used_before + time.perf_counter() - self.started

    def stamp(self):
        """timing['wall_s'] brought up to now, for a checkpoint about to be written."""
        self.timing["wall_s"] = self.used_s()

    def training_left_s(self):
        """Seconds of the budget left for training steps: what is left less the end-of-run work's (inf: no budget)."""
        if not self.budget_min:
            return math.inf
        return self.budget_min * 60 - self.used_s() - self.reserve_s

    def out_of_time(self):
        return self.training_left_s() <= 0

    def progress(self, running_epoch_s=0.0):
        """How far training is through the time it gets, in [0, 1] (0 without a budget)."""
        if not self.budget_min:
            return 0.0
        trained, left = self.timing["train_s"] + running_epoch_s, max(0.0, self.training_left_s())
        return trained / (trained + left) if trained + left > 0 else 1.0

    def minutes_left(self):
        """Minutes of the budget left, the end-of-run work's included (None without a budget)."""
        return max(0.0, self.budget_min - self.used_s() / 60) if self.budget_min else None

    def forward_s_per_image(self):
        """Seconds of a no-grad forward per image: an evaluation's, else a third of a training step's; 0 before any."""
        if self.eval_rate is not None:
            return self.eval_rate
        trained_s = self.session_train_s + self.epoch_seconds()
        return trained_s / self.session_images / 3 if self.session_images else 0.0

    def record_forwards(self, seconds, images):
        """An evaluation's measured forward speed: `images` images in `seconds`."""
        if images:
            self.eval_rate = seconds / images

    @contextlib.contextmanager
    def timed(self, key):
        """Adds the block's seconds to timing[key]."""
        start = time.perf_counter()
        yield
        self.timing[key] = self.timing.get(key, 0.0) + time.perf_counter() - start


class Reporter:
    """What a training run tells people: progress bars on a terminal, else a line per epoch and at read-outs at most
    every LOG_LINE_SECONDS; TensorBoard events with --tensorboard. Only rank 0 speaks, nothing when quiet. A context
    manager: the TensorBoard writer is closed on every way out."""

    def __init__(self, quiet, tensorboard_dir, is_main):
        self.verbose = not quiet and is_main
        self.bars = self.verbose and stderr_is_terminal()
        self.tensorboard_dir = tensorboard_dir if is_main else None
        self.writer = self.epoch_bar = self.batch_bar = None
        self.total_epochs = None
        self.last_line = time.perf_counter()  # when the last log line (no terminal) was printed

    def __enter__(self):
        if self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # only when asked for: tensorboard is optional
            self.writer = SummaryWriter(self.tensorboard_dir)
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def say(self, text):
        if self.verbose:
            print(text, flush=True)

    def introduce(self, run, changes):
        """The run's banner: what it trains and from where (changes: a resume's {setting: (old, new)}), how it computes
        and how its grids sample."""
        config, name, state = run.config, run.config["run_name"], run.state
        what = (f"resuming '{name}' from {run.resumed_from} at epoch {state.epoch + 1}, batch {state.batch_in_epoch}"
                if run.resumed_from else f"training '{name}'")
        budget, used_min = config["time_budget_min"], run.clock.used_s() / 60
        self.say(f"{what}: {'conditional' if config['conditional'] else 'unconditional'} DDPM on {run.device}, "
                 f"{run.num_params / 1e6:.2f}M parameters, {data_description(config)} ({config['num_train']} "
                 f"train / {config['num_val']} val / {config['num_test']} test images), T={config['timesteps']} "
                 f"({config['schedule']})"
                 + (f"; {run.world_size} ranks × batch {config['batch_size']}" if run.world_size > 1 else "")
                 + (f"; time budget {budget:g} min for the whole run: {used_min:.1f} used, "
                    f"{max(0, budget - used_min):.1f} left" if budget else ""))
        self.say(compute_description(run))
        self.say(grid_description(run))
        if changes:
            self.say("changed from the checkpoint: " + ", ".join(
                f"{key} {setting_text(key, old)} → {setting_text(key, new)}" for key, (old, new) in changes.items()))

    def epochs(self, done, total):
        """The epochs still to train, done + 1 … total."""
        self.total_epochs = total
        self.epoch_bar = tqdm(range(done + 1, total + 1), desc="epochs", disable=not self.bars, initial=done,
                              total=total)
        return self.epoch_bar

    def batches(self, batches, total, done, epoch):
        self.batch_bar = tqdm(batches, total=total, initial=done, desc=f"epoch {epoch}", leave=False,
                              disable=not self.bars)
        return self.batch_bar

    def read_out(self, step, epoch, loss, lr, images_per_s, minutes_left, skipped=None):
        """A loss read-out; minutes_left of the budget (None: none); skipped: fp16 steps skipped (None: not fp16)."""
        postfix = {"loss": f"{loss:.4f}", "img_s": f"{images_per_s:.0f}"}
        self.batch_bar.set_postfix(postfix if skipped is None else {**postfix, "fp16_skips": skipped})
        if self.verbose and not self.bars and time.perf_counter() - self.last_line >= LOG_LINE_SECONDS:
            budget = f"  {minutes_left:.1f} min of the budget left" if minutes_left is not None else ""
            skips = f"  {skipped} fp16 steps skipped (overflow)" if skipped is not None else ""
            print(f"step {step}  epoch {epoch}  loss {loss:.4f}  lr {lr:.3g}  {images_per_s:.0f} img/s{skips}{budget}",
                  flush=True)
            self.last_line = time.perf_counter()
        self.scalars(step, {"train/loss": loss, "train/lr": lr, "train/images_per_s": images_per_s,
                            **({"train/fp16_skipped_steps": skipped} if skipped is not None else {})})

    def epoch_done(self, epoch, step, train_loss, losses, images_per_s, cut_short=None):
        """losses: {'val_loss', 'test_loss'} or None; cut_short: '34 of 703 batches' when the budget cut it short."""
        if losses:
            self.epoch_bar.set_postfix(train=f"{train_loss:.4f}", val=f"{losses['val_loss']:.4f}")
        if self.verbose and not self.bars:  # a line per epoch where there are no bars (logs, pipes)
            evaluated = f"  val {losses['val_loss']:.4f}  test {losses['test_loss']:.4f}" if losses else ""
            part = f" ({cut_short})" if cut_short else ""
            print(f"epoch {epoch}/{self.total_epochs}{part}  train {train_loss:.4f}{evaluated}  "
                  f"({images_per_s:.0f} img/s)", flush=True)
        self.scalars(step, {"epoch/train_loss": train_loss, "epoch/images_per_s": images_per_s,
                            **{f"epoch/{key}": value for key, value in (losses or {}).items()}})

    def grid(self, step, images, nrow):
        if self.writer is not None:
            self.writer.add_image("samples", tile(images, nrow), step)

    def scalars(self, step, values):
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)


def compute_description(run):
    """How the run computes, for people: the precision and why, compilation, and the micro-batches of a step."""
    config = run.config
    text = (f"compute: {describe_precision(run.precision)} ({run.precision_why}); weights, EMA and optimizer "
            f"state in float32; {'torch.compile' if run.train_step.denoiser.compiled else 'eager'}")
    if config["grad_accum"] > 1:
        text += (f"; {config['grad_accum']} micro-batches of {config['batch_size']} per optimizer step"
                 + (f" on each of {run.world_size} ranks" if run.world_size > 1 else "")
                 + f": {config['global_batch_size']} images a step")
    return text


def grid_description(run):
    """How the run's grids (and FID's samples) are drawn, and why the grids' sampler is not the config's when not."""
    guided = run.config["conditional"]
    grids, own = run.grid_sampler.settings, run.sampler.settings
    text = f"grids: {describe_sampling(grids, guided)}"
    if grids != own:
        text += (f"; the checkpoint's sampler, {describe_sampling(own, guided)}, is too slow for a CPU's grids "
                 "(--inference uses it)")
    elif run.options.eval_fid:
        text += "; FID's samples too"
    return text


def data_description(config):
    """What the model is trained on, for people, with the padding to the U-Net's side when there is one."""
    facts, side = trained_data(config), config["image_size"]
    stages = len(config["model"]["dim_mults"])
    padded = (f", padded to {side}×{side} for the U-Net's {stages} stages (samples are cut back)"
              if facts["data_size"] != [side, side] else "")
    return describe_data(facts) + padded


def setting_text(key, value):
    """A config setting's value for people (the sampling settings as SamplerSettings.describe says them)."""
    if key == "sampling" and value is not None:
        return f"({describe_sampling(SamplerSettings(**value))})"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
