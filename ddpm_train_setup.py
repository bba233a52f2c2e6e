"""A training run's set-up: its options (TrainingOptions), what it builds once (Run: data on the device, the networks,
the samplers, the resolved config, FID's reference), and its start — a fresh TrainingState or a checkpoint's put back —
with the banner that says what it trains and how.

ddpm_main.py's train() sets a run up here and trains it with ddpm_train.py. Nothing here reads the command line.
"""
import copy
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from ddpm_checkpoint import TrainingState, build_checkpoint, restore_training, write_config_json
from ddpm_config import build_diffusion, build_model, data_conflicts, resume_changes, trained_data, training_config
from ddpm_data import (DEFAULT_DATA_DIR, DeviceLoader, data_facts, describe_data, evenly_spread, load_dataset,
                       train_val_split)
from ddpm_diffusion import Diffusion, SamplerSettings
from ddpm_fid import InceptionFeatures, Reference, ref_statistics_file
from ddpm_helpers import RunFiles, UserError
from ddpm_pictures import GRID_SEED, save_grid, to_model_range
from ddpm_runtime import Denoiser, SignalFlag, choose_compile, choose_precision, describe_precision
from ddpm_sample import Sampler, fid_reference
from ddpm_train_step import EVAL_IMAGES, Reporter, TrainingClock, TrainingStep, build_loss_scaler, build_optimizer

CPU_GRID_STEPS = 50       # on a CPU, a grid whose sampler takes more steps (ddpm's T) uses dpm++2m's default instead


@dataclass(frozen=True)
class TrainingOptions:
    """How a training run goes about it, beside what it trains (the config): its files and device, how often it saves,
    evaluates and reports, how it samples and measures. ddpm_main.py fills it from the command line: each flag's
    default and meaning are its Setting's (ddpm_config), the comments here only say what the run does with it."""
    files: RunFiles                 # where checkpoints and outputs go, under the run's (checked) name
    device: torch.device
    command_line: tuple             # the run's arguments, for the commands that resume it
    resume: str                     # the last.pt the run continues (None: a new run)
    data_dir: str                   # --data_dir (None: a resumed run's, else ./data)
    dataset: str                    # --dataset (None: a resumed run's, else what data_dir holds)
    rank: int                       # under torchrun, this process's rank and the number of ranks
    world_size: int
    compile: str                    # --compile: auto, on or off
    checkpoint_every: int           # epochs between last.pt writes
    checkpoint_minutes: float       # also write last.pt after this many minutes without one
    eval_every: int                 # epochs between evaluations (losses, grid, plot)
    log_interval: int               # steps between loss read-outs
    save_model: bool                # also write ckpt.pt at the end
    sample_batch: int               # images per sampling batch (grids, FID)
    started: float                  # time.perf_counter() when the command started: the budget's wall clock
    eval_fid: int                   # FID and IS of this many samples at the end (0: none)
    fid_inception: str              # the Inception weights file (--fid_inception; None: fetched)
    fid_ref: str                    # the split whose statistics FID compares with (--fid_ref)
    fid_ref_stats: str              # reference statistics (None: the --fid_ref split's)
    eval_nll: int                   # the bound in bits/dim on this many test images at the end (0: none)
    nll_variance: str               # σ_t² of p_θ in the bound: β̃_t ('posterior') or β_t ('beta'); None: the sampler's
    quiet: bool                     # no bars or per-epoch lines
    tensorboard: str                # a TensorBoard log folder (None: none)


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
    stages = len(config["model"]["dim_mults"])
    padded = (f", padded to {side}×{side} for the U-Net's {stages} stages (samples are cut back)"
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
