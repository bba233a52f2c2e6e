"""A training run: its options, its set-up (data on the device, the networks, the resolved config), the epoch of
training steps, evaluation (losses, grids, plots), checkpoint saves, signals, and the end (final checkpoint, FID,
metrics).

ddpm_main.py's train() is the story these pieces make; the step itself, the clock and the reporting are in
ddpm_train.py. Nothing here reads the command line: a run takes its config (what it trains) and TrainingOptions (how
it goes about it).
"""
import contextlib
import copy
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from ddpm_checkpoint import (TrainingState, build_checkpoint, build_diffusion, build_model, data_conflicts,
                             require_finite_weights, restore_training, resume_changes, save_checkpoint, trained_data,
                             training_config, write_config_json)
from ddpm_data import DEFAULT_DATA_DIR, DeviceLoader, data_facts, describe_data, load_dataset, train_val_split
from ddpm_diffusion import Diffusion, SamplerSettings
from ddpm_fid import InceptionFeatures, Reference, ref_statistics_file
from ddpm_helpers import (Denoiser, Interrupted, NonFiniteError, RunFiles, UserError, all_ranks_mean, barrier,
                          choose_compile, choose_precision, describe_precision, max_over_ranks, memory_guard,
                          plot_loss_history, save_grid, to_model_range, write_json)
from ddpm_sample import (MAX_CLASS_ROWS, Sampler, fid_reference, grayscale_fid_note, measure_fid_and_is,
                         measure_nll, spread)
from ddpm_train import (Reporter, TrainingClock, TrainingStep, build_loss_scaler, build_optimizer, evaluate_loss,
                        learning_rate)

GRID_SEED = 4321          # fixed noise for the per-epoch sample grid, so epochs can be compared
GRID_PER_CLASS = 8        # columns of the per-epoch grid of a conditional model (one row per class)
GRID_UNCONDITIONAL = 64   # images in the per-epoch grid of an unconditional model
EVAL_IMAGES = 1000        # the validation and test losses are over this many images of each split, evenly spread
CPU_GRID_STEPS = 50       # on a CPU, a grid whose sampler takes more steps (ddpm's T) uses dpm++2m's default instead
BATCH_REMEDY = "lower --batch_size (--grad_accum K keeps K × --batch_size images a step)"
SAMPLE_REMEDY = "lower --sample_batch"


@dataclass(frozen=True)
class TrainingOptions:
    """How a training run goes about it, beside what it trains (the config): its files and device, how often it saves,
    evaluates and reports, how it samples and measures. ddpm_main.py fills it from the command line."""
    files: RunFiles                 # where checkpoints and outputs go, under the run's (checked) name
    device: torch.device
    command_line: tuple = ()        # the run's arguments, for the commands that resume it
    resume: str = None              # the last.pt the run continues (None: a new run)
    data_dir: str = None            # --data_dir (None: a resumed run's, else ./data)
    dataset: str = None             # --dataset (None: a resumed run's, else what data_dir holds)
    rank: int = 0                   # under torchrun, this process's rank and the number of ranks
    world_size: int = 1
    compile: str = "auto"           # --compile: auto, on or off
    checkpoint_every: int = 1       # epochs between last.pt writes
    checkpoint_minutes: float = 10  # also write last.pt after this many minutes without one
    eval_every: int = 1             # epochs between evaluations (losses, grid, plot)
    log_interval: int = 100         # steps between loss read-outs
    save_model: bool = False        # also write ckpt.pt at the end
    sample_batch: int = 1000        # images per sampling batch (grids, FID)
    started: float = None           # time.perf_counter() when the command started: the budget's wall clock
    eval_fid: int = 0               # FID and IS of this many samples at the end (0: none)
    fid_inception: str = None       # the Inception weights file (--fid_inception; None: fetched)
    fid_ref: str = "train"          # the split whose statistics FID compares with (--fid_ref)
    fid_ref_stats: str = None       # reference statistics (None: the --fid_ref split's)
    eval_nll: int = 0               # the bound in bits/dim on this many test images at the end (0: none)
    nll_variance: str = None  # σ_t² of p_θ in the bound: β̃_t ('posterior') or β_t ('beta'); None: the sampler's
    quiet: bool = False             # no bars or per-epoch lines
    tensorboard: str = None         # a TensorBoard log folder (None: none)


class StopRequested(Exception):
    """SIGINT / SIGTERM outside the training steps (an evaluation, a picture, the end-of-run work): raised at once."""


class SignalFlag:
    """SIGINT / SIGTERM during a run. Between training steps (between_steps) a flag, checked after every step, so
    the step finishes and the ranks stop together; elsewhere, in a single process, a StopRequested raised at once
    (immediate), so a long evaluation or sampler stops within seconds (under torchrun the flag, for the ranks to
    agree on). A second signal stops at once."""

    def __init__(self, immediate=True):
        self.received, self.previous, self.immediate = None, {}, immediate

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])  # a second signal stops at once
        if self.immediate:
            raise StopRequested(self.received)

    @contextlib.contextmanager
    def between_steps(self):
        """While training steps run: a signal only sets the flag, for the caller to check."""
        immediate, self.immediate = self.immediate, False
        try:
            yield
        finally:
            self.immediate = immediate

    @contextlib.contextmanager
    def deferred(self):
        """A block that must finish once begun (a record and its checkpoint): a signal during it stops after it."""
        with self.between_steps():
            yield
        if self.immediate and self.received:
            raise StopRequested(self.received)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass(eq=False)
class Run:
    """What a training run builds once. Training settings are read from config alone (a resumed run's come
    from its checkpoint); options holds how the run goes about it: files, intervals, reporting, FID."""
    options: TrainingOptions
    config: dict
    train_loader: DeviceLoader
    eval_loaders: dict             # 'val' and 'test': the validation and test splits
    model: nn.Module
    ema_model: nn.Module
    optimizer: torch.optim.Optimizer
    diffusion: Diffusion
    train_step: TrainingStep
    sampler: Sampler               # the EMA weights with the config's settings: FID, the bound
    grid_sampler: Sampler          # the same weights with the grids' settings (grid_settings)
    precision_why: str             # why the U-Net computes in run.precision (choose_precision), for the banner
    report: Reporter
    decode_s: float                # seconds spent reading the data
    test_images: torch.Tensor = None  # the test split (N, C, H, W) uint8 on the CPU: --eval_nll's images
    fid_features: InceptionFeatures = None  # --eval_fid's network, loaded and tried on one image before training
    fid_reference: Reference = None  # what --eval_fid compares with, read or computed before training
    last_saved: tuple = None       # (path, where training stood) of the last good last.pt; None: none yet
    last_save_time: float = dataclasses.field(default_factory=time.perf_counter)  # for --checkpoint_minutes
    clock: TrainingClock = None    # the run's wall clock and time budget (set once the TrainingState is known)
    signals: SignalFlag = None     # SIGINT / SIGTERM, while the run trains and finishes

    @property
    def device(self):
        return self.options.device

    @property
    def is_main(self):  # only rank 0 writes files and prints
        return self.options.rank == 0

    @property
    def world_size(self):
        return self.options.world_size

    @property
    def ema_denoiser(self):  # evaluation, grids and FID use the EMA weights
        return self.sampler.denoiser

    @property
    def precision(self):  # what the U-Net computes in: config["precision"] resolved for the device
        return self.train_step.denoiser.precision

    @property
    def num_params(self):
        return sum(p.numel() for p in self.model.parameters())

    @property
    def files(self):
        """Where the run's checkpoints and outputs go (the run name is the config's)."""
        return self.options.files

    def checkpoint(self, state):
        return build_checkpoint(self.config, self.model, self.ema_model, self.optimizer, state,
                                self.device.type == "cuda", self.train_step.scaler)


def set_up_run(settings, given, options, saved):
    """Read the data, resolve the config (from the command line's settings, or for a resumed run from its checkpoint
    `saved`: ddpm_checkpoint.training_config, with `given` the settings given on the command line), and build the
    loaders, networks, optimizer and diffusion on the device."""
    data_dir = options.data_dir or (saved["config"]["data_dir"] if saved else DEFAULT_DATA_DIR)
    dataset = options.dataset or (saved["config"].get("dataset") if saved and not options.data_dir else None)
    # FID's network is fetched (once) and runs on one image now: a bad file costs seconds, not the run
    fid_features = InceptionFeatures(options.fid_inception, options.device, verbose=not options.quiet) \
        if options.eval_fid and options.rank == 0 else None
    start = time.perf_counter()
    data = load_dataset(data_dir, dataset)
    train_idx, val_idx = train_val_split(len(data["train_images"]))
    decode_s = time.perf_counter() - start
    facts = data_facts(data)
    fid_ref_stats = check_data(options, saved, facts, data_dir)
    if data["mode_note"] and options.rank == 0:
        print(f"warning: {data['mode_note']}", file=sys.stderr)
    config = training_config({**settings, "data_dir": data_dir},
                             {**facts, "num_train": len(train_idx), "num_val": len(val_idx),
                              "num_test": len(data["test_images"])}, saved and saved["config"], given)
    fid_ref = fid_reference_of_run(options, fid_features, fid_ref_stats, config, data, data_dir)
    if options.rank == 0:
        os.makedirs(options.files.save_dir, exist_ok=True)
        os.makedirs(options.files.ckpt_dir, exist_ok=True)
    train_loader, eval_loaders = device_loaders(data, train_idx, val_idx, config, options)
    return Run(options=options, config=config, train_loader=train_loader, eval_loaders=eval_loaders,
               **build_networks(config, options),
               report=Reporter(options.quiet, options.tensorboard, options.rank == 0), decode_s=decode_s,
               test_images=data["test_images"], fid_features=fid_features, fid_reference=fid_ref)


def fid_reference_of_run(options, fid_features, fid_ref_stats, config, data, data_dir):
    """What --eval_fid compares with, made before training (its time is the set-up's, and the end of the run holds no
    surprise): --fid_ref_stats, else the statistics of the --fid_ref split; None without FID's network (no --eval_fid,
    or a rank other than 0)."""
    if fid_features is None:
        return None
    if fid_ref_stats is not None:
        return fid_ref_stats
    return fid_reference(fid_features, config, data[f"{options.fid_ref}_images"], data_dir, None, options.fid_ref,
                         not options.quiet)


def device_loaders(data, train_idx, val_idx, config, options):
    """The training split's loader (shuffled, flipped) and the validation and test losses' {'val', 'test'}: EVAL_IMAGES
    of each split, evenly spread (the same images every evaluation). They live on the device as uint8 tensors. A
    batch holds an optimizer step's micro-batches, and the evaluation's batches as many images (no gradients kept), so
    its t and ε are drawn as with one --batch_size."""
    batch_size, side = config["batch_size"] * config["grad_accum"], config["image_size"]  # smaller images are padded
    shards = {"device": options.device, "rank": options.rank, "world_size": options.world_size, "side": side}
    train_loader = DeviceLoader(data["train_images"][train_idx], data["train_labels"][train_idx], batch_size,
                                shuffle=True, flip=True, seed=config["seed"], **shards)
    test_idx = torch.arange(len(data["test_images"]))
    eval_loaders = {name: DeviceLoader(images[chosen], labels[chosen], batch_size, shuffle=False, flip=False, **shards)
                    for name, images, labels, chosen in (
                        ("val", data["train_images"], data["train_labels"], evenly_spread(val_idx, EVAL_IMAGES)),
                        ("test", data["test_images"], data["test_labels"], evenly_spread(test_idx, EVAL_IMAGES)))}
    return train_loader, eval_loaders


def evenly_spread(indices, count):
    """`count` of the indices (all when there are fewer), evenly spaced: in a class-sorted split, every class."""
    if len(indices) <= count:
        return indices
    return indices[torch.linspace(0, len(indices) - 1, count).round().long()]


def build_networks(config, options):
    """The U-Net (seeded by the config), its EMA, AdamW, the diffusion, the training step (through DDP under torchrun)
    and the EMA's Sampler, at the precision and compilation chosen for the device: the Run's fields of those names."""
    device = options.device
    torch.manual_seed(config["seed"])
    model = build_model(config).to(device, memory_format=torch.channels_last)  # faster convolutions, GPU and CPU
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # no dropout where the EMA samples
    optimizer = build_optimizer(model, config["lr"], config["weight_decay"])
    diffusion = build_diffusion(config, device)
    precision, precision_why = choose_precision(config["precision"], device)
    compile_model = choose_compile(options.compile, device)
    trained_model = model
    if options.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        trained_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_step = TrainingStep(model, ema_model, optimizer, diffusion, Denoiser(trained_model, compile_model, precision),
                              config["p_uncond"], config["loss_type"], config["ema_decay"], options.rank,
                              options.world_size, config["grad_accum"], build_loss_scaler(precision, device))
    settings = SamplerSettings(**config["sampling"]).for_timesteps(config["timesteps"])
    sampler = Sampler(diffusion, Denoiser(ema_model, compile_model, precision), settings, config, options.sample_batch)
    grid_sampler = dataclasses.replace(sampler, settings=grid_settings(settings, config["timesteps"], device))
    return {"model": model, "ema_model": ema_model, "optimizer": optimizer, "diffusion": diffusion,
            "train_step": train_step, "sampler": sampler, "grid_sampler": grid_sampler, "precision_why": precision_why}


def grid_settings(settings, timesteps, device):
    """How a training run samples its grids: with the config's settings, except on a CPU when they take more than
    CPU_GRID_STEPS network evaluations (the ddpm sampler's T ancestral steps: hours for the paper's network), where
    DPM-Solver++(2M) at its default steps and the config's guidance stand in (inference keeps the config's)."""
    if device.type == "cuda" or settings.steps <= CPU_GRID_STEPS:
        return settings
    return SamplerSettings(guidance_scale=settings.guidance_scale,
                           guidance_interval=settings.guidance_interval).for_timesteps(timesteps)


def check_data(options, saved, facts, data_dir):
    """What the data must be, once read: a resumed run's the data its checkpoint was trained on, and --fid_ref_stats
    statistics of it (UserError: nothing has been written yet). Returns those statistics (a Reference), or None."""
    conflicts = data_conflicts(saved["config"], facts) if saved else {}
    if conflicts:
        raise UserError(f"--resume: the data at {data_dir!r} is not what the run was trained on ("
                        + "; ".join(f"{key} {data_text(old)} in the checkpoint, {data_text(new)} here"
                                    for key, (old, new) in conflicts.items())
                        + "); point --data_dir (and --dataset) at the run's data")
    return ref_statistics_file(options.fid_ref_stats, facts) if options.eval_fid and options.fid_ref_stats else None


def data_text(value):
    """A data fact for people: class lists shortened ('10: airplane, automobile, …'), sizes as H×W."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        return f"{len(value)}: {', '.join(value[:3])}{', …' if len(value) > 3 else ''}"
    return "×".join(map(str, value)) if isinstance(value, list) else str(value)


def start_or_resume(run, saved):
    """A fresh TrainingState (and the forward-process picture), or the checkpoint's weights, optimizer, RNG
    states and TrainingState put back; config.json either way."""
    config, name = run.config, run.config["run_name"]
    if saved:
        state = restore_training(saved, run.model, run.ema_model, run.optimizer, run.device.type == "cuda",
                                 run.train_step.scaler)
        for group in run.optimizer.param_groups:  # the state's own is the checkpoint's: an adjustable setting
            group["weight_decay"] = config["weight_decay"]
        run.last_saved = (run.options.resume, training_position(state))
    else:
        state = TrainingState()
        state.timing["decode_s"] = run.decode_s
    run.clock = TrainingClock(state.timing, config["time_budget_min"], run.train_step.denoiser.compiled, run.device,
                              run.options.started)
    if run.is_main:
        write_config_json(config, run.files.checkpoint("config.json"))
        if not saved:
            save_forward_strip(run.diffusion, run.train_loader.images[:1], run.files.output("forward_strip"))
    what = (f"resuming '{name}' from {run.options.resume} at epoch {state.epoch + 1}, batch {state.batch_in_epoch}"
            if saved else f"training '{name}'")
    budget, used_min = config["time_budget_min"], run.clock.used_s() / 60
    run.report.say(f"{what}: {'conditional' if config['conditional'] else 'unconditional'} DDPM on {run.device}, "
                   f"{run.num_params / 1e6:.2f}M parameters, {data_description(config)} ({config['num_train']} "
                   f"train / {config['num_val']} val / {config['num_test']} test images), T={config['timesteps']} "
                   f"({config['schedule']})"
                   + (f"; {run.world_size} ranks × batch {config['batch_size']}" if run.world_size > 1 else "")
                   + (f"; time budget {budget:g} min for the whole run: {used_min:.1f} used, "
                      f"{max(0, budget - used_min):.1f} left" if budget else ""))
    run.report.say(compute_description(run))
    run.report.say(grid_description(run))
    if saved:
        changes = resume_changes(saved["config"], config)
        if changes:
            run.report.say("changed from the checkpoint: " + ", ".join(
                f"{key} {setting_text(key, old)} → {setting_text(key, new)}" for key, (old, new) in changes.items()))
    return state


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
    """How the run's grids (and FID's samples) are drawn, for people, and why the grids' sampler is not the config's
    when it is not (grid_settings)."""
    guided = run.config["conditional"]
    grids, own = run.grid_sampler.settings, run.sampler.settings
    text = f"grids: {grids.describe(guided)}"
    if grids != own:
        text += (f"; the checkpoint's sampler, {own.describe(guided)}, is too slow for a CPU's grids (--inference "
                 "uses it)")
    elif run.options.eval_fid:
        text += "; FID's samples too"
    return text


def data_description(config):
    """What the model is trained on, for people, with the padding to the U-Net's side when there is one."""
    facts, side = trained_data(config), config["image_size"]
    padded = (f", padded to {side}×{side} for the U-Net's {len(config['dim_mults'])} stages (samples are cut back)"
              if facts["data_size"] != [side, side] else "")
    return describe_data(facts) + padded


def training_position(state):
    """Where training stands, for people: 'step 140: epoch 3, batch 5' (mid-epoch) or 'step 140: epoch 2 done'."""
    if state.batch_in_epoch:
        return f"step {state.step}: epoch {state.epoch + 1}, batch {state.batch_in_epoch}"
    return f"step {state.step}: epoch {state.epoch} done"


def setting_text(key, value):
    """A config setting's value for people (the sampling settings as SamplerSettings.describe says them)."""
    if key == "sampling" and value is not None:
        return f"({SamplerSettings(**value).describe()})"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def save_forward_strip(diffusion, image_uint8, path, count=10):
    """One training image noised at `count` evenly spaced t, left (t = 0) to right (t = T−1)."""
    x0 = to_model_range(image_uint8.to(diffusion.betas.device)).expand(count, -1, -1, -1)
    t = torch.linspace(0, diffusion.timesteps - 1, count).round().long().to(x0.device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(GRID_SEED)).to(x0.device)
    save_grid(diffusion.q_sample(x0, t, noise), path, nrow=count)


def train_epochs(run, state, clock):
    """Epoch after epoch until the config's epochs, a signal (last.pt saved, then Interrupted) or the time budget
    (the end-of-run work's time kept back) stops training; each evaluated every --eval_every epochs and at the end,
    last.pt saved every --checkpoint_every epochs, when evaluated, and before the end-of-run work starts. An epoch
    the budget cuts short is not counted as done: a resume goes on from its batch."""
    config, report, options = run.config, run.report, run.options
    for epoch in report.epochs(state.epoch, config["epochs"]):
        with memory_guard(f"training on batches of {config['batch_size']}", BATCH_REMEDY):
            images_per_s = train_one_epoch(run, state, clock, epoch)
        interrupted, budget_spent = (bool(v) for v in max_over_ranks(
            [run.signals.received is not None, clock.out_of_time()], run.world_size))
        if interrupted:
            stop_on_signal(run, state, run.signals.received)
        whole = state.batch_in_epoch == len(run.train_loader)
        if budget_spent:
            state.budget_spent = True
            report.say(budget_stop_line(run, state, clock))
        evaluated = epoch == config["epochs"] or budget_spent or epoch % options.eval_every == 0
        train_loss = state.epoch_loss_sum / max(1, state.batch_in_epoch)
        losses = evaluation_losses(run, clock, epoch) if evaluated else None  # (NaN stops before the checkpoint)
        with run.signals.deferred():  # the epoch's record and checkpoints: all of them or, on a signal, none
            is_best = losses is not None and record_evaluation(run, state, epoch, train_loss, losses)
            if whole:
                state.finish_epoch(epoch)
            if evaluated or epoch % options.checkpoint_every == 0:
                save_epoch_checkpoints(run, state, is_best)
        if evaluated and run.is_main:  # the grid after the checkpoint: a picture never delays it
            write_epoch_grid(run, state, clock, epoch)
        with run.signals.deferred():
            report.epoch_done(epoch, state.step, train_loss, losses, images_per_s,
                              None if whole else f"{state.batch_in_epoch} of {len(run.train_loader)} batches")
        if budget_spent:
            break


def budget_stop_line(run, state, clock):
    """What to say when the time budget stops training: where, the time used, and what is left for."""
    return (f"time budget: training stopped at {training_position(state)} of {len(run.train_loader)}, "
            f"{clock.used_s() / 60:.1f} of {run.config['time_budget_min']:g} min used; the rest is for "
            f"{end_of_run_work_text(run)} (about {clock.reserve_s / 60:.1f} min)")


def end_of_run_work_text(run):
    """The end-of-run work, for people: 'the losses, the grid and the checkpoints' (and FID, the bound)."""
    parts = ["the losses", "the grid", "the checkpoints"] + \
        [what for what, asked in (("FID", run.options.eval_fid), ("the bound", run.options.eval_nll)) if asked]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def end_of_run_seconds(run, clock):
    """The end-of-run work's seconds, estimated from the speeds the clock has measured: the last evaluation (its
    losses and grid), --eval_fid's samples and Inception pass, --eval_nll's T evaluations an image, and the
    checkpoint writes (last.pt before and after the evaluation, best.pt, ckpt.pt)."""
    options, forward_s = run.options, clock.forward_s_per_image()
    forwards = sum(loader.num_local for loader in run.eval_loaders.values())
    if run.is_main:
        forwards += grid_size(run) * network_evaluations(run.grid_sampler)
        forwards += options.eval_fid * network_evaluations(run.sampler) + options.eval_nll * run.config["timesteps"]
    inception_s = options.eval_fid * run.fid_features.seconds_per_image if options.eval_fid and run.is_main else 0.0
    return forwards * forward_s + inception_s + (3 + options.save_model) * clock.save_s


def network_evaluations(sampler):
    """Forward passes of one image a sample costs: the sampler's steps, twice where classifier-free guidance runs
    both branches (counted at every step: an upper bound with a guidance interval)."""
    guided = sampler.config["conditional"] and sampler.settings.guidance_scale not in (0, 1)
    return sampler.settings.steps * (2 if guided else 1)


def train_one_epoch(run, state, clock, epoch):
    """The epoch's training steps, from where it stands to its end, or until a signal or the time budget stops
    them (checked after every step). Losses stay on the device until a read-out (every --log_interval steps), the
    only host syncs. Returns the epoch's training images per second."""
    config, world_size, steps_per_epoch = run.config, run.world_size, len(run.train_loader)
    run.model.train()
    loss_sum = torch.tensor(state.epoch_loss_sum, device=run.device)
    skipped = torch.zeros((), device=run.device)  # fp16 steps the loss scaler skipped in this epoch
    batches = run.report.batches(run.train_loader.batches(epoch, state.batch_in_epoch), steps_per_epoch,
                                 state.batch_in_epoch, epoch)
    clock.start_epoch()
    interval_start, interval_images, epoch_images = clock.epoch_start, 0, 0
    with run.signals.between_steps():
        for x, y in batches:  # x (B, 3, H, W) in [−1, 1], y (B,)
            with clock.step(len(x)):
                # how far along, for the lr decay: by training time under a budget (as the ranks last agreed), else
                # by steps
                progress = (clock.agreed_progress if config["time_budget_min"]
                            else state.step / (config["epochs"] * steps_per_epoch))
                lr = learning_rate(config, state.step, progress)
                loss, step_skipped = run.train_step(x, y, state.step, lr)
                loss_sum += loss
                skipped += step_skipped
                state.step += 1
                state.batch_in_epoch += 1
            interval_images += len(x)
            epoch_images += len(x)
            if state.step % run.options.log_interval == 0:
                running = (all_ranks_mean(loss_sum, world_size) / state.batch_in_epoch).item()
                check_finite(running, f"the training loss at epoch {epoch}, step {state.step}")
                now = time.perf_counter()
                run.report.read_out(state.step, epoch, running, lr,
                                    interval_images * world_size / (now - interval_start), clock.minutes_left(),
                                    state.skipped_steps + int(skipped.item()) if run.train_step.scaler else None)
                interval_start, interval_images = now, 0
            stop, checkpoint_due = agree_on_stop_and_checkpoint(run, clock)
            if stop:
                break
            if checkpoint_due:
                save_mid_epoch(run, state, clock, loss_sum, skipped)
    state.epoch_loss_sum = all_ranks_mean(loss_sum, world_size).item()  # waits for the device: steps are done
    state.skipped_steps += int(skipped.item())
    epoch_train_s = clock.end_epoch()
    check_finite(state.epoch_loss_sum, f"the training loss of epoch {epoch} (step {state.step})")
    return epoch_images * world_size / max(epoch_train_s, 1e-9)


def agree_on_stop_and_checkpoint(run, clock):
    """Whether to stop inside the epoch (a signal, or the budget spent once the end-of-run work's time is kept
    back), and whether last.pt is due (--checkpoint_minutes since the last one): after every step, decided by all
    ranks together in one all-reduce of host numbers, which also agrees on the lr's progress."""
    clock.reserve_s = end_of_run_seconds(run, clock)
    due = time.perf_counter() - run.last_save_time >= run.options.checkpoint_minutes * 60
    signalled, spent, due, clock.agreed_progress = max_over_ranks(
        [run.signals.received is not None, clock.out_of_time(), due, clock.progress(clock.epoch_seconds())],
        run.world_size)
    return bool(signalled or spent), bool(due)


def check_finite(value, what):
    """NonFiniteError when a loss about to be reported or written is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} became {value}")


def save_last(run, state):
    """last.pt where training stands (rank 0 writes it and gets the checkpoint dict back; other ranks None). Every
    rank checks the weights (the same on all), so that NaN weights stop all ranks together and are never written."""
    ckpt, path, start = None, run.files.checkpoint("last.pt"), time.perf_counter()
    run.clock.stamp()
    if run.is_main:
        ckpt = run.checkpoint(state)
        save_checkpoint(ckpt, path)
    else:  # nothing to write: only the weights' check
        require_finite_weights({"model": run.model.state_dict(), "ema": run.ema_model.state_dict()})
    run.last_saved, run.last_save_time = (path, training_position(state)), time.perf_counter()
    run.clock.save_s = run.last_save_time - start
    return ckpt


def save_mid_epoch(run, state, clock, loss_sum, skipped):
    """last.pt inside an epoch (--checkpoint_minutes): the position, the epoch's loss sum and fp16 skips, and the
    training time so far, so that a resume continues from this very step."""
    clock.stamp()
    timing = {**state.timing, "train_s": state.timing["train_s"] + clock.epoch_seconds()}
    snapshot = dataclasses.replace(state, epoch_loss_sum=all_ranks_mean(loss_sum, run.world_size).item(),
                                   skipped_steps=state.skipped_steps + int(skipped.item()), timing=timing)
    save_last(run, snapshot)


def save_epoch_checkpoints(run, state, is_best):
    """last.pt, and best.pt (without the optimizer) when the validation loss is the best so far."""
    last = save_last(run, state)
    if is_best and run.is_main:
        save_checkpoint(last, run.files.checkpoint("best.pt"), with_optimizer=False)


def stop_on_signal(run, state, signal_name):
    """Save last.pt where training stands (mid-epoch included; not again when it was just saved there), then stop
    with the command that resumes."""
    if run.last_saved != (run.files.checkpoint("last.pt"), training_position(state)):
        save_last(run, state)
    barrier(run.world_size)
    raise Interrupted(f"{signal_name or 'a signal (on another rank)'} received: stopped at {training_position(state)}"
                      f"; saved {run.files.checkpoint('last.pt')}. Resume with:\n"
                      f"  {resume_command(run.options.command_line, resume='auto')}")


def resume_command(argv, **flags):
    """The command line of this run (its arguments: argv) with each of `flags` (e.g. resume="auto") in place of
    its value there."""
    replaced = {f"--{name}" for name in flags}
    kept, argv = [], iter(argv)
    for arg in argv:
        if arg.split("=")[0] not in replaced:
            kept.append(arg)
        elif "=" not in arg:
            next(argv, None)  # "--flag value": drop the value too
    return " ".join(["python", sys.argv[0], *kept, *(f"--{name} {value}" for name, value in flags.items())])


def evaluation_losses(run, clock, epoch):
    """EMA validation and test losses on EVAL_IMAGES of each split (fixed t and ε, so epochs compare): {'val_loss',
    'test_loss'}; NonFiniteError on NaN, before anything is written from them."""
    config = run.config
    start = time.perf_counter()
    with clock.timed("eval_s"), memory_guard("computing the validation and test losses", "lower --batch_size"):
        run.ema_model.eval()
        losses = {f"{split}_loss": evaluate_loss(run.diffusion, run.ema_denoiser, loader, config["conditional"],
                                                 config["loss_type"]) for split, loader in run.eval_loaders.items()}
    clock.record_forwards(time.perf_counter() - start, sum(loader.num_local for loader in run.eval_loaders.values()))
    for key, value in losses.items():  # the same on every rank: all stop together
        check_finite(value, f"the {'validation' if key == 'val_loss' else 'test'} loss of epoch {epoch}")
    return losses


def write_epoch_grid(run, state, clock, epoch):
    """The epoch's sample grid, from fixed noise (GRID_SEED) so epochs compare, to its PNG and TensorBoard."""
    with clock.timed("sample_s"), memory_guard("sampling the epoch's grid", SAMPLE_REMEDY):
        images = run.grid_sampler.sample(grid_size(run), grid_labels(run), seed=GRID_SEED)
        save_grid(images, run.files.output("epoch_grid", epoch=epoch), grid_columns(run))
    run.report.grid(state.step, images, grid_columns(run))


def record_evaluation(run, state, epoch, train_loss, losses):
    """The evaluation in the history (an epoch the time budget cut short at the fraction of it done), and on rank 0
    the loss JSON and plot. Returns whether the validation loss is the best so far."""
    steps_per_epoch = len(run.train_loader)
    epochs_done = epoch if state.batch_in_epoch == steps_per_epoch else \
        round(state.epoch + state.batch_in_epoch / steps_per_epoch, 3)
    is_best = state.record_evaluation(epochs_done, train_loss, losses["val_loss"], losses["test_loss"])
    if run.is_main:
        write_json(state.history, run.files.output("loss_history"))
        plot_loss_history(state.history, run.files.output("loss_curves"), run.config["run_name"])
    return is_best


def grid_labels(run):
    """The per-epoch grid's class labels: GRID_PER_CLASS of each class, a row each (with more than MAX_CLASS_ROWS
    classes, one image per class); None for an unconditional model."""
    num_classes = run.config["num_classes"]
    if not run.config["conditional"]:
        return None
    per_class = GRID_PER_CLASS if num_classes <= MAX_CLASS_ROWS else 1
    return torch.arange(num_classes, device=run.device).repeat_interleave(per_class)


def grid_size(run):
    """Images in the per-epoch grid: GRID_UNCONDITIONAL unconditional, else one per grid label."""
    labels = grid_labels(run)
    return GRID_UNCONDITIONAL if labels is None else len(labels)


def grid_columns(run):
    """The per-epoch grid's columns: 8 (8 × 8 unconditional, 8 per class a row), or about √K for K > MAX_CLASS_ROWS
    classes."""
    num_classes = run.config["num_classes"]
    if run.config["conditional"] and num_classes > MAX_CLASS_ROWS:
        return math.isqrt(num_classes - 1) + 1  # ⌈√K⌉ columns
    return GRID_PER_CLASS


def finish(run, state, clock):
    """Rank 0 writes the final checkpoint (--save_model), FID (--eval_fid) and the metrics JSON; others wait."""
    if not run.is_main:
        barrier(run.world_size)
        return
    options, config, timing = run.options, run.config, state.timing
    if options.save_model:
        save_checkpoint(run.checkpoint(state), run.files.checkpoint("ckpt.pt"))
    if options.eval_fid:
        with clock.timed("fid_s"), memory_guard("computing FID", SAMPLE_REMEDY):
            grayscale_fid_note(config, run.report.verbose)
            measured = measure_fid_and_is(run.sampler, options.eval_fid, config["seed"], run.fid_features,
                                          run.fid_reference, run.files.output("fid_samples"), run.report.verbose)
        run.report.scalars(state.step, {name: measured[name] for name in ("fid", "inception_score")
                                        if measured[name] is not None})
    if options.eval_nll:
        with clock.timed("nll_s"), memory_guard("computing the bound in bits/dim", SAMPLE_REMEDY):
            test_images, _ = spread(run.test_images, None, options.eval_nll)
            nll = measure_nll(run.sampler, test_images, None, options.nll_variance, config["seed"], run.files,
                              run.report.verbose)["bits_per_dim"]
    clock.stamp()
    images_seen = state.step * config["global_batch_size"]
    metrics = {"world_size": run.world_size, "run_name": config["run_name"], "device": str(run.device),
               "num_params": run.num_params, "steps": state.step,
               "epochs_done": state.epoch, "batch_size": config["batch_size"], "grad_accum": config["grad_accum"],
               "global_batch_size": config["global_batch_size"], "precision": run.precision,
               "compiled": run.train_step.denoiser.compiled, "fp16_skipped_steps": state.skipped_steps,
               "time_budget_min": config["time_budget_min"], "stopped_by_time_budget": state.budget_spent,
               "train_images_per_s": images_seen / timing["train_s"] if timing["train_s"] else None,
               "timing": timing, "final": {k: v[-1] for k, v in state.history.items() if v},
               **(measured if options.eval_fid else {}), **({"nll_bits_per_dim": nll} if options.eval_nll else {})}
    write_json(metrics, run.files.output("metrics"))
    budget = f" of the {config['time_budget_min']:g}-minute budget" if config["time_budget_min"] else ""
    run.report.say(f"done in {clock.used_s() / 60:.1f} min{budget}: loss history {run.files.output('loss_history')}, "
                   f"checkpoints in {run.files.ckpt_dir}")
    barrier(run.world_size)


def diverged_message(run, problem):
    """What to say when training produced NaN or infinity: the problem, the last checkpoint that is really good
    (or that there is none), and the command that continues from it with a tenth of the learning rate."""
    lower_lr = f"{run.config['lr'] / 10:g}"
    if run.last_saved is None:
        return (f"{problem}; stopped, and this run wrote no checkpoint before that. Start again with a lower --lr "
                f"(e.g. {lower_lr}) or a larger --warmup_steps.")
    path, position = run.last_saved
    return (f"{problem}; stopped. The last good checkpoint is {path} ({position}); to continue from it with a "
            f"lower learning rate:\n  {resume_command(run.options.command_line, resume=path, lr=lower_lr)}")


def write_failed_message(run, problem):
    """What to say when a file could not be written: training stops (it does not go on as if saved), and the last
    good checkpoint, which the failed write left as it was, is where to go on from."""
    if run.last_saved is None:
        return f"{problem}; training stopped, and this run has no checkpoint yet: make room and start it again"
    path, position = run.last_saved
    return (f"{problem}; training stopped. The last good checkpoint is {path} ({position}): make room (or restore "
            f"access) and continue with --resume {path}")
