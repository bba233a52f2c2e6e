"""Train a DDPM on CIFAR-10 (unconditional, or class-conditional with classifier-free guidance), or on CIFAR-100,
MNIST, Fashion-MNIST or any folder of images, and sample from a saved checkpoint.

    python ddpm_main.py --epochs 30 --save_model --run_name DDPM_30epochs
    python ddpm_main.py --conditional --epochs 30 --p_uncond 0.1 --save_model --run_name DDPM_cond
    python ddpm_main.py --inference --model_path models/DDPM_30epochs/ckpt.pt --num_samples 64
"""
import argparse
import copy
import dataclasses
import importlib.util
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm_checkpoint import (SEED_RANGE, TOOL_VERSION, TrainingState, build_checkpoint, build_diffusion, build_model,
                             data_conflicts, fixed_setting_conflicts, load_checkpoint, load_resumable, memory_needs,
                             require_finite_weights, restore_training, resume_changes, sampling_model, save_checkpoint,
                             saved_sampler_settings, trained_data, training_config, write_config_json)
from ddpm_data import (DATASETS, DEFAULT_DATA_DIR, DeviceLoader, crop_to_data, data_facts, describe_data,
                       image_size_of, load_dataset, model_side, require_image_folder, stages_allowed, train_val_split)
from ddpm_diffusion import (DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLING_STEPS, LOSS_TYPES, PREDICTIONS, SAMPLERS,
                            SCHEDULES, SPACINGS, Diffusion, SamplerSettings, generate, guidance_sweep)
from ddpm_fid import FIDFeatures, frechet_distance, ref_statistics_file, reference_statistics
from ddpm_helpers import (COMPILE_CHOICES, PRECISIONS, RUN_NAME_CHARACTERS, Denoiser, NonFiniteError, OutOfMemory,
                          RunFiles, UserError, WriteError, all_ranks_mean, atomic_open, barrier, check_memory,
                          check_run_name, check_writable_folder, choose_compile, choose_precision, describe_precision,
                          init_distributed, max_over_ranks, memory_guard, plot_loss_history, require_finite,
                          sanitized_run_name, save_grid, save_individual_pngs, save_labelled_grid, stderr_is_terminal,
                          to_model_range, to_uint8, write_json)
from ddpm_model import UNetConfig
from ddpm_train import (LR_DECAYS, TrainingClock, TrainingStep, build_loss_scaler, build_optimizer, evaluate_loss,
                        learning_rate)

GRID_SEED = 4321          # fixed noise for the per-epoch sample grid, so epochs can be compared
GRID_PER_CLASS = 8        # columns of the per-epoch grid of a conditional model (one row per class)
MAX_CLASS_ROWS = 16       # with more classes, grids show one image per class (or, sweeps, the first this many)
GRID_UNCONDITIONAL = 64   # images in the per-epoch grid of an unconditional model
LOG_LINE_SECONDS = 60     # without a terminal, the least time between two training log lines
BATCH_REMEDY = "lower --batch_size (--grad_accum K keeps K × --batch_size images a step)"
SAMPLE_REMEDY = "lower --sample_batch"


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss diverged): reported as one line, exit status 1."""


class Interrupted(Exception):
    """SIGINT / SIGTERM during training: state saved, reported with how to resume; exit status 130."""


# --------------------------------------------------------------------------------------- CLI

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, the message and a pointer to --help (no usage block); exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each flag's default after its help (flags without one say in words)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def float_list(text):
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser():
    p = ArgumentParser(prog="ddpm_main.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"%(prog)s {TOOL_VERSION} (ddpm-cifar10), torch {torch.__version__}")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5,
                   help="passes over the training split (90 %% of the training images: 45,000 for CIFAR-10)")
    g.add_argument("--batch_size", type=int, default=64,
                   help="images per forward pass (per rank under torchrun); an optimizer step takes --grad_accum "
                   "of them")
    g.add_argument("--grad_accum", type=int, default=1, metavar="K",
                   help="micro-batches of --batch_size per optimizer step, their gradients summed: the batch of K × "
                   "--batch_size (× ranks) in the memory of one --batch_size")
    g.add_argument("--lr", type=float, default=0.003, help="AdamW learning rate (after warm-up)")
    g.add_argument("--warmup_steps", type=int, default=200, help="linear learning-rate warm-up, in steps")
    g.add_argument("--timesteps", type=int, default=100, help="T, the number of diffusion steps")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="noise schedule β_t")
    g.add_argument("--loss_type", choices=LOSS_TYPES, default="l2", help="norm of ε − ε_θ (or v − v_θ)")
    g.add_argument("--prediction", choices=PREDICTIONS, default="eps",
                   help="what the network predicts: the noise ε (Ho et al.) or v = √ᾱ ε − √(1−ᾱ) x_0")
    g.add_argument("--min_snr_gamma", type=float,
                   help="Min-SNR-γ loss weighting, e.g. 5 (default: uniform over t)")
    g.add_argument("--lr_decay", choices=LR_DECAYS, default="none",
                   help="after warm-up: constant lr, or cosine decay to 0 over --epochs (or --time_budget_min)")
    g.add_argument("--conditional", action="store_true", help="class-conditional model (classifier-free guidance)")
    g.add_argument("--p_uncond", type=float, default=0.1, help="probability a label is dropped to the null label")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the weights used for sampling; 0: off")
    g.add_argument("--dim", type=int, default=32,
                   help=f"U-Net base channels, a multiple of {UNetConfig.groups} (its GroupNorm groups)")
    g.add_argument("--dim_mults", type=int_list, default="1,2,4",
                   help="U-Net channel multipliers, one per stage; each stage after the first halves the image")
    g.add_argument("--data_dir", help="a train/<class>/ test/<class>/ image-folder tree, or where --dataset is "
                   "downloaded (default: ./data; at inference the folder the model was trained on)")
    g.add_argument("--dataset", choices=DATASETS,
                   help="what --data_dir holds: a torchvision dataset, downloaded there when missing, or an image "
                   "folder (default: folder when --data_dir holds train/ and test/, else cifar10; at inference the "
                   "model's)")
    g.add_argument("--checkpoint_every", type=int, default=1,
                   help="epochs between last.pt writes (the last epoch, interruptions and evaluations always)")
    g.add_argument("--checkpoint_minutes", type=float, default=10,
                   help="also write last.pt after this many minutes without one, mid-epoch included: a killed run "
                   "loses at most this much")
    g.add_argument("--eval_every", type=int, default=1,
                   help="epochs between validation/test losses, grids and plots (the last epoch always)")
    g.add_argument("--save_model", action="store_true", help="also write models/<run_name>/ckpt.pt at the end")
    g.add_argument("--models_dir", default="models", help="checkpoints go to <models_dir>/<run_name>/")
    g.add_argument("--log_interval", type=int, default=100,
                   help="steps between loss read-outs and NaN checks; without a terminal, a log line at a read-out "
                   f"once {LOG_LINE_SECONDS} s have passed since the last")
    g.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a last.pt ('auto': <models_dir>/<run_name>/last.pt) with its settings; --lr, "
                   "--lr_decay, --warmup_steps, --epochs, --time_budget_min, --precision, the intervals, folders and "
                   "sampling flags may change, the model and diffusion may not")
    g.add_argument("--time_budget_min", type=float,
                   help="stop training after this many minutes of training steps in all (a resumed run counts "
                   "what it spent before), then finish cleanly (default: no limit)")
    g.add_argument("--tensorboard", metavar="DIR",
                   help="also log to TensorBoard in DIR: loss and lr at read-outs, img/s, validation/test losses, "
                   "FID and the per-epoch grids (needs the tensorboard package; view with tensorboard --logdir DIR)")

    g = p.add_argument_group("inference")
    g.add_argument("--inference", action="store_true", help="sample from --model_path instead of training")
    g.add_argument("--model_path", help="checkpoint to sample from")
    g.add_argument("--num_samples", type=int, default=64, help="images to generate")
    g.add_argument("--sample_classes", help="comma list of class indices or names (e.g. 3,5 or cat,dog), cycled to "
                   f"--num_samples (default: all the model's classes; a sweep's first {MAX_CLASS_ROWS})")
    g.add_argument("--guidance_sweep", type=float_list, metavar="W,W,...",
                   help="write one grid: a row per guidance scale, a column per class, from the same noise")

    g = p.add_argument_group(
        "sampling (inference, the per-epoch grids and FID)",
        "Every checkpoint carries the settings it samples with: training stores these flags (or their\n"
        "defaults), and inference uses the checkpoint's unless a flag says otherwise. A --sampler other than\n"
        "the checkpoint's starts from that sampler's defaults (the guidance scale stays the checkpoint's).")
    g.add_argument("--sampler", choices=SAMPLERS,
                   help="dpm++2m (the default where the checkpoint names none): DPM-Solver++(2M), second order "
                   "(Lu et al. 2022); ddim: first order (Song et al. 2021); ddpm: all T ancestral steps (Ho et al. "
                   "2020), slow")
    g.add_argument("--sampling_steps", type=int,
                   help=f"network evaluations of dpm++2m and ddim (default {DEFAULT_SAMPLING_STEPS}, or T when "
                   "T is smaller)")
    g.add_argument("--spacing", choices=SPACINGS,
                   help="where dpm++2m's steps fall: evenly in λ_t = log(√ᾱ_t / √(1−ᾱ_t)) (lambda, the default: "
                   "the better FID in BENCHMARKS.md), or evenly in t (time, as DDIM's)")
    g.add_argument("--guidance_scale", type=float,
                   help=f"classifier-free guidance w: 0 unconditional, 1 conditional, >1 stronger class (default "
                   f"{DEFAULT_GUIDANCE_SCALE})")
    g.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic (default), 1 like DDPM")
    g.add_argument("--sample_batch", type=int, default=1000, help="images generated per forward batch")

    g = p.add_argument_group("FID (Fréchet Inception Distance)")
    g.add_argument("--eval_fid", type=int, default=0, metavar="N",
                   help="after training, or with --inference: FID of N samples against the training images")
    g.add_argument("--fid_inception", metavar="PATH",
                   help="TF-Inception pool-feature TorchScript for FID (.pt or .pt.xz)")
    g.add_argument("--fid_ref_stats", metavar="NPZ",
                   help="reference statistics (mu, sigma) instead of computing them from the training images")

    g = p.add_argument_group("general")
    g.add_argument("--run_name", help="names the checkpoint folder and output files (default: DDPM; at inference "
                   "the checkpoint's run name)")
    g.add_argument("--save_dir", default="outputs", help="folder for grids, samples and JSON")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed, same results on CPU)")
    g.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help="torch.compile the U-Net for training, grids, inference and FID: auto on CUDA only; on: on "
                   "the CPU too (through inductor: minutes of compiling, no faster on a 2-core CPU); off: eager")
    g.add_argument("--no_compile", action="store_true", help="the same as --compile off")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="what the U-Net computes in, for training and sampling (weights, EMA, optimizer and "
                   "checkpoints stay float32): auto is bf16 autocast where the hardware has bf16 (CUDA compute capability ≥ 8.0, "
                   "CPUs with AVX512-BF16 or AMX), fp16 autocast with a dynamic loss scaler on older CUDA GPUs, else "
                   "fp32")
    g.add_argument("--no_bf16", action="store_true", help="the same as --precision fp32 (kept for older scripts)")
    g.add_argument("--no_cuda", action="store_true", help="run on CPU even when CUDA is available")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


AT_LEAST_ONE = ("epochs", "batch_size", "grad_accum", "timesteps", "num_samples", "log_interval", "sample_batch",
                "dim", "eval_every", "checkpoint_every", "sampling_steps")
NUMBER_RANGES = [  # (flag, test, what the value must be) for the flags that are not off (None)
    *((name, lambda v: v >= 1, "at least 1") for name in AT_LEAST_ONE),
    ("lr", lambda v: v > 0, "greater than 0"),
    ("p_uncond", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("min_snr_gamma", lambda v: v > 0, "greater than 0"),
    ("warmup_steps", lambda v: v >= 0, "0 or more"),
    ("eta", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("guidance_scale", lambda v: v >= 0, "0 or more"),
    ("checkpoint_minutes", lambda v: v > 0, "greater than 0"),
    ("time_budget_min", lambda v: v > 0, "greater than 0"),
    ("eval_fid", lambda v: v >= 0, "0 (off) or a sample count"),
    ("seed", lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1], f"in {SEED_RANGE[0]} … {SEED_RANGE[1]}, the random "
     "generator's range"),
]


def check_args(args, parser):
    """Reject bad input before anything is read or written (one line, exit status 2): the numbers, which flags go
    together, then the files and folders they name."""
    try:
        check_numbers(args)
        check_flag_combinations(args)
        check_paths(args)
    except UserError as e:
        parser.error(str(e))


def check_numbers(args):
    """Every number finite and in its range; the U-Net's width and stages ones it can be built with."""
    for name, value in vars(args).items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise UserError(f"--{name} must be finite, got {value}")
    for name, in_range, must in NUMBER_RANGES:
        value = getattr(args, name)
        if value is not None and not in_range(value):
            raise UserError(f"--{name} must be {must}, got {value}")
    if args.dim % UNetConfig.groups:
        raise UserError(f"--dim must be a multiple of {UNetConfig.groups} (the U-Net's GroupNorm groups), "
                        f"got {args.dim}")
    if any(m < 1 for m in args.dim_mults):
        raise UserError(f"--dim_mults must be positive integers, got {args.dim_mults}")
    if args.guidance_sweep is not None and (not args.guidance_sweep or min(args.guidance_sweep) < 0):
        raise UserError("--guidance_sweep needs non-negative guidance scales, e.g. 0,1,3,5,7")
    if args.sample_classes is not None:
        args.sample_classes = parse_classes(args.sample_classes)


def check_flag_combinations(args):
    """Flags that need others, or that belong to the other job (training or inference)."""
    if args.inference and not args.model_path:
        raise UserError("--inference needs --model_path (a checkpoint written by training with this tool)")
    if args.resume is not None and args.inference:
        raise UserError("--resume continues training; for sampling use --inference --model_path")
    if not args.inference and args.resume is None:  # a new run's model is known: check its sampling flags now
        sampler_settings(args, None, args.timesteps)
    if args.sample_classes is not None and not (args.inference and (args.conditional or args.guidance_sweep)):
        raise UserError("--sample_classes picks the classes of class-guided samples: it goes with --inference "
                        "--conditional (or --guidance_sweep)")
    if args.guidance_sweep is not None and not args.inference:
        raise UserError("--guidance_sweep goes with --inference (it samples from a trained model)")
    resolve_synonyms(args)
    if args.eval_fid and not args.fid_inception:
        raise UserError("--eval_fid needs --fid_inception PATH: the TF-Inception TorchScript (see README, FID)")
    if args.tensorboard is not None:
        if args.inference:
            raise UserError("--tensorboard logs training; --inference writes its samples and metrics to --save_dir")
        if importlib.util.find_spec("tensorboard") is None:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")


def resolve_synonyms(args):
    """--no_compile is --compile off and --no_bf16 is --precision fp32; given beside a contradicting --compile or
    --precision, they are an error."""
    for old, flag, value in (("no_compile", "compile", "off"), ("no_bf16", "precision", "fp32")):
        if getattr(args, old):
            if flag in args.given and getattr(args, flag) != value:
                raise UserError(f"--{old} means --{flag} {value}, but --{flag} {getattr(args, flag)} was given too; "
                                "give one of them")
            setattr(args, flag, value)
            args.given = args.given | {flag}  # as if given: a resume takes it over the checkpoint's


def check_paths(args):
    """The run name is a name, the files the flags name exist, the folders they name can be written, and a new run's
    images can be halved once per U-Net stage and its model, schedule and samples fit in memory (from the first
    image's header: nothing else is read)."""
    if args.run_name is not None:
        check_run_name(args.run_name)
    if args.eval_fid:
        if not os.path.isfile(args.fid_inception):
            raise UserError(f"--fid_inception {args.fid_inception!r} is not a file")
        if args.fid_ref_stats and not os.path.isfile(args.fid_ref_stats):
            raise UserError(f"--fid_ref_stats {args.fid_ref_stats!r} is not a file")
    folders = {"--save_dir": args.save_dir}
    if not args.inference:
        folders.update({"--models_dir": args.models_dir, "--tensorboard": args.tensorboard})
    for flag, folder in folders.items():
        if folder is not None:
            check_writable_folder(folder, flag)
    if not args.inference and args.resume is None:
        data_dir = args.data_dir or DEFAULT_DATA_DIR
        if args.dataset == "folder":
            require_image_folder(data_dir)
        image_size = image_size_of(data_dir, args.dataset)
        check_stage_count(args.dim_mults, image_size)
        # a lower bound: one channel and no classes (the data is not read yet), and the unconditional grid
        model = UNetConfig(dim=args.dim, dim_mults=tuple(args.dim_mults), channels=1)
        check_run_memory(args, model, args.timesteps, model_side(image_size or (1, 1), len(args.dim_mults)),
                         max(GRID_UNCONDITIONAL, args.eval_fid), training=True, guided=False)


def check_run_memory(args, model_config, timesteps, side, samples, training, guided):
    """UserError before anything is allocated when the weights, the schedule, one sampling batch and the samples kept
    need more memory than the device (and for the samples, the machine) has: ddpm_checkpoint.memory_needs. On CUDA a
    batch that does not fit is halved down to one image (generate), so only one image of it must fit there."""
    device = pick_device(args)
    batch = 1 if device.type == "cuda" else min(args.sample_batch, samples)
    needs = memory_needs(model_config, timesteps, side, batch, samples, training, guided)
    check_memory(needs[:3], device, needs[3:])


def check_stage_count(dim_mults, image_size):
    """UserError when the U-Net has more stages than the images can be halved (padded, they allow
    stages_allowed); image_size (H, W), or None when unknown (the data is then checked as it is read)."""
    if image_size is not None and len(dim_mults) > stages_allowed(image_size):
        raise UserError(f"--dim_mults {','.join(map(str, dim_mults))} has {len(dim_mults)} stages, which need "
                        f"images of at least {2 ** (len(dim_mults) - 1)} pixels a side; these images are "
                        f"{image_size[0]}×{image_size[1]}, which allow at most {stages_allowed(image_size)} stages")


def parse_classes(text):
    """--sample_classes as a list of its items (class indices or names), checked against the checkpoint's classes by
    class_indices."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise UserError("--sample_classes is empty: give class indices or names such as 0,1,2 or cat,dog")
    return items


def class_indices(items, classes):
    """The class index of each --sample_classes item: one of the model's class names, else an index 0 … K−1 (a class
    named by a number is taken by its name)."""
    indices = []
    for item in items:
        if item in classes:
            indices.append(classes.index(item))
        elif item.lstrip("-").isdigit() and 0 <= int(item) < len(classes):
            indices.append(int(item))
        else:
            names = ", ".join(classes[:12]) + (", …" if len(classes) > 12 else "")
            raise UserError(f"--sample_classes: {item!r} is neither a class index 0-{len(classes) - 1} nor a class "
                            f"name of this model ({names})")
    return indices


# ------------------------------------------------------------------- shared by training and inference

def run_files(args):
    """Where this command's files go: RunFiles of --models_dir, --save_dir and the (checked) run name."""
    return RunFiles(args.models_dir, args.save_dir, args.run_name)


def pick_device(args):
    if torch.cuda.is_available() and not args.no_cuda:
        return torch.device("cuda", getattr(args, "local_rank", 0))
    return torch.device("cpu")


def sampler_settings(args, saved, timesteps):
    """How to sample a T-step model (inference, the per-epoch grids and FID): the sampling flags given, else the
    checkpoint's settings `saved` (None: SamplerSettings' defaults). A --sampler other than the saved one starts
    from that sampler's defaults, keeping the saved guidance scale. Steps are filled in for T."""
    base = saved or SamplerSettings()
    if args.sampler is not None and args.sampler != base.sampler:
        base = SamplerSettings(args.sampler, guidance_scale=base.guidance_scale)
    given = {field: getattr(args, flag) for field, flag in (("sampler", "sampler"), ("steps", "sampling_steps"),
                                                           ("spacing", "spacing"), ("eta", "eta"),
                                                           ("guidance_scale", "guidance_scale"))
             if getattr(args, flag) is not None}
    settings = dataclasses.replace(base, **given)
    if settings.sampler == "ddpm" and args.sampling_steps is not None:
        raise UserError("--sampling_steps applies to --sampler dpm++2m and ddim (ddpm always runs all T steps)")
    if settings.sampler != "dpm++2m" and args.spacing is not None:
        raise UserError(f"--spacing applies to --sampler dpm++2m (the sampler here is {settings.sampler}: ddim "
                        "spaces its steps evenly in t, ddpm runs all T)")
    if settings.sampler != "ddim" and args.eta is not None:
        raise UserError(f"--eta applies to --sampler ddim (the sampler here is {settings.sampler})")
    try:
        return settings.for_timesteps(timesteps)
    except ValueError:  # steps > T (check_args rejects steps < 1)
        raise UserError(f"--sampling_steps {settings.steps} is more than the model's T = {timesteps}") from None


def sample_images(diffusion, denoiser, settings, config, num_images, class_labels=None, batch_size=1000, seed=None,
                  progress=False):
    """num_images samples of the config's model (generate), cut back to the data's size when the model works on
    padded images: (num_images, C, H, W) in [−1, 1] on the CPU."""
    images = generate(diffusion, denoiser, settings, num_images, config["image_size"], config["model"]["channels"],
                      class_labels, batch_size, seed, progress)
    return crop_to_data(images, trained_data(config)["data_size"])


def fid_reference(args, config, data_dir, train_images_uint8, device, verbose, features=None):
    """The Inception features (`features`, loaded now when None) and the reference statistics (mu, sigma) FID
    compares the model's samples with: --fid_ref_stats, or the training images (train_images_uint8 (N, C, H, W), or
    those at data_dir when None); either must describe the data the model was trained on (UserError)."""
    features = features or FIDFeatures(args.fid_inception, device)
    facts = trained_data(config)
    if facts["channels"] == 1 and verbose:
        print("FID: the grayscale images are repeated into the Inception network's three colour channels", flush=True)
    dataset = args.dataset or (config.get("dataset") if data_dir == config["data_dir"] else None)  # None: resolved
    reference = reference_statistics(features, data_dir, dataset, facts, train_images_uint8, args.fid_ref_stats,
                                     verbose and stderr_is_terminal())
    return features, reference


def measure_fid(diffusion, denoiser, settings, config, args, seed, features, reference, verbose):
    """FID of args.eval_fid new samples (class-balanced when the model is conditional) against the reference
    statistics (fid_reference). The samples are saved as fid_samples_<run>.npz, so any other FID tool can read the
    very same images."""
    n = args.eval_fid
    if n < 10000:
        print(f"warning: FID from {n} < 10,000 samples reads high; use 10,000 or more to compare with published "
              "figures", file=sys.stderr)
    device = diffusion.betas.device
    labels = torch.arange(n, device=device) % config["num_classes"] if config["conditional"] else None
    images = to_uint8(sample_images(diffusion, denoiser, settings, config, n, labels, args.sample_batch, seed,
                                    verbose and stderr_is_terminal()))
    with atomic_open(run_files(args).output("fid_samples")) as f:
        np.savez(f, images=images)
    fid = frechet_distance(*features.statistics(images), *reference)
    if verbose:
        print(f"FID {fid:.3f} (n={n}, {settings.describe()})", flush=True)
    return fid


# ----------------------------------------------------------------------------------- train

class SignalFlag:
    """Turns SIGINT / SIGTERM into a flag checked after every training step."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])  # a second signal stops at once

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_finite(value, what):
    """NonFiniteError when a loss about to be reported or written is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} became {value}")


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


def diverged_message(run, problem):
    """What to say when training produced NaN or infinity: the problem, the last checkpoint that is really good
    (or that there is none), and the command that continues from it with a tenth of the learning rate."""
    lower_lr = f"{run.config['lr'] / 10:g}"
    if run.last_saved is None:
        return (f"{problem}; stopped, and this run wrote no checkpoint before that. Start again with a lower --lr "
                f"(e.g. {lower_lr}) or a larger --warmup_steps.")
    path, position = run.last_saved
    return (f"{problem}; stopped. The last good checkpoint is {path} ({position}); to continue from it with a "
            f"lower learning rate:\n  {resume_command(run.args.argv, resume=path, lr=lower_lr)}")


def write_failed_message(run, problem):
    """What to say when a file could not be written: training stops (it does not go on as if saved), and the last
    good checkpoint, which the failed write left as it was, is where to go on from."""
    if run.last_saved is None:
        return f"{problem}; training stopped, and this run has no checkpoint yet: make room and start it again"
    path, position = run.last_saved
    return (f"{problem}; training stopped. The last good checkpoint is {path} ({position}): make room (or restore "
            f"access) and continue with --resume {path}")


def save_forward_strip(diffusion, image_uint8, path, count=10):
    """One training image noised at `count` evenly spaced t, left (t = 0) to right (t = T−1)."""
    x0 = to_model_range(image_uint8.to(diffusion.betas.device)).expand(count, -1, -1, -1)
    t = torch.linspace(0, diffusion.timesteps - 1, count).round().long().to(x0.device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(GRID_SEED)).to(x0.device)
    save_grid(diffusion.q_sample(x0, t, noise), path, nrow=count)


class Reporter:
    """What a training run tells people: progress bars on a terminal, else a line per epoch and a line at read-outs
    at most every LOG_LINE_SECONDS; with --tensorboard
    the loss and lr at read-outs, img/s, validation/test losses, FID and the per-epoch grids as TensorBoard
    events. Only rank 0 speaks, and nothing with --quiet. Used as a context manager, so that the TensorBoard
    writer is closed on every way out: the end, Ctrl-C / SIGTERM, a NaN stop, an error."""

    def __init__(self, args, is_main):
        self.verbose = not args.quiet and is_main
        self.bars = self.verbose and stderr_is_terminal()
        self.tensorboard_dir = args.tensorboard if is_main else None
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
        """A loss read-out; minutes_left: of the time budget (None: no budget); skipped: fp16 steps the loss scaler
        has skipped so far (None: not fp16)."""
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

    def epoch_done(self, epoch, step, train_loss, losses, images_per_s):
        """losses: {'val_loss', 'test_loss'} on evaluated epochs, else None."""
        if losses:
            self.epoch_bar.set_postfix(train=f"{train_loss:.4f}", val=f"{losses['val_loss']:.4f}")
        if self.verbose and not self.bars:  # a line per epoch where there are no bars (logs, pipes)
            evaluated = f"  val {losses['val_loss']:.4f}  test {losses['test_loss']:.4f}" if losses else ""
            print(f"epoch {epoch}/{self.total_epochs}  train {train_loss:.4f}{evaluated}  ({images_per_s:.0f} img/s)",
                  flush=True)
        self.scalars(step, {"epoch/train_loss": train_loss, "epoch/images_per_s": images_per_s,
                            **{f"epoch/{key}": value for key, value in (losses or {}).items()}})

    def grid(self, step, images, nrow):
        if self.writer is not None:
            from torchvision.utils import make_grid
            self.writer.add_image("samples", make_grid(images.float(), nrow=nrow, normalize=True, value_range=(-1, 1),
                                                       padding=2), step)

    def scalars(self, step, values):
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)


@dataclass(eq=False)
class Run:
    """What a training run builds once. Training settings are read from config alone (a resumed run's come
    from its checkpoint); args holds the run's other options: outputs, logging, sampling, FID."""
    args: argparse.Namespace
    config: dict
    device: torch.device
    train_images: torch.Tensor     # the training folder's images (N, 3, H, W) uint8: FID's reference
    train_loader: DeviceLoader
    eval_loaders: dict             # 'val' and 'test': the validation and test splits
    model: nn.Module
    ema_model: nn.Module
    optimizer: torch.optim.Optimizer
    diffusion: Diffusion
    train_step: TrainingStep
    ema_denoiser: Denoiser         # evaluation, grids and FID use the EMA weights
    sampler: SamplerSettings       # how the grids and FID sample
    report: Reporter
    decode_s: float                # seconds spent reading the data
    precision: str                 # what the U-Net computes in: config["precision"] resolved for the device
    precision_why: str             # and why (choose_precision), for the banner
    fid_features: FIDFeatures = None  # --eval_fid's network, loaded and tried on one image before training
    last_saved: tuple = None       # (path, where training stood) of the last good last.pt; None: none yet
    last_save_time: float = dataclasses.field(default_factory=time.perf_counter)  # for --checkpoint_minutes

    @property
    def is_main(self):  # only rank 0 writes files and prints
        return self.args.rank == 0

    @property
    def world_size(self):
        return self.args.world_size

    @property
    def num_params(self):
        return sum(p.numel() for p in self.model.parameters())

    @property
    def files(self):
        """Where the run's checkpoints and outputs go (args.run_name is the config's)."""
        return run_files(self.args)

    def checkpoint(self, state):
        return build_checkpoint(self.config, self.model, self.ema_model, self.optimizer, state,
                                self.device.type == "cuda", self.train_step.scaler)

    def sample(self, num_images, class_labels=None, seed=None, progress=False):
        """Samples from the EMA weights at the data's size, (num_images, C, H, W) in [−1, 1] on the CPU."""
        return sample_images(self.diffusion, self.ema_denoiser, self.sampler, self.config, num_images, class_labels,
                             self.args.sample_batch, seed, progress)


def set_up_run(args, saved):
    """Read the data, resolve the config (from the flags, or for a resumed run from its checkpoint `saved`), and
    build the loaders, networks, optimizer and diffusion on the device."""
    device = pick_device(args)
    use_cuda, rank, world_size = device.type == "cuda", args.rank, args.world_size
    sampling = (sampler_settings(args, saved_sampler_settings(saved["config"]), saved["config"]["timesteps"])
                if saved else sampler_settings(args, None, args.timesteps))
    data_dir = args.data_dir or (saved["config"]["data_dir"] if saved else DEFAULT_DATA_DIR)
    dataset = args.dataset or (saved["config"].get("dataset") if saved and not args.data_dir else None)
    # FID's network runs on one image now: a bad file costs seconds, not the run
    fid_features = FIDFeatures(args.fid_inception, device) if args.eval_fid and rank == 0 else None
    start = time.perf_counter()
    data = load_dataset(data_dir, dataset)
    train_idx, val_idx = train_val_split(len(data["train_images"]))
    decode_s = time.perf_counter() - start
    facts = data_facts(data)
    check_data(args, saved, facts, data_dir)
    if data["mode_note"] and rank == 0:
        print(f"warning: {data['mode_note']}", file=sys.stderr)
    config = training_config({**vars(args), "data_dir": data_dir, "sampling": sampling},
                             {**facts, "num_train": len(train_idx), "num_val": len(val_idx),
                              "num_test": len(data["test_images"])}, saved and saved["config"], args.given)
    if rank == 0:
        os.makedirs(args.save_dir, exist_ok=True)
        os.makedirs(run_files(args).ckpt_dir, exist_ok=True)

    # the splits live on the device as uint8 tensors; a batch holds an optimizer step's micro-batches, and the
    # evaluation's batches as many images (no gradients kept), so its t and ε are drawn as with one --batch_size
    batch_size = config["batch_size"] * config["grad_accum"]
    side = config["image_size"]  # images smaller than the U-Net's side are padded to it, batch by batch
    train_loader = DeviceLoader(data["train_images"][train_idx], data["train_labels"][train_idx], batch_size, device,
                                shuffle=True, flip=True, seed=config["seed"], rank=rank, world_size=world_size,
                                side=side)
    eval_loaders = {name: DeviceLoader(images, labels, batch_size, device, shuffle=False, flip=False, rank=rank,
                                       world_size=world_size, side=side)
                    for name, images, labels in (
                        ("val", data["train_images"][val_idx], data["train_labels"][val_idx]),
                        ("test", data["test_images"], data["test_labels"]))}

    # model, EMA, optimizer, diffusion; the training forward runs through DDP under torchrun
    torch.manual_seed(config["seed"])
    model = build_model(config).to(device, memory_format=torch.channels_last)  # faster convolutions, GPU and CPU
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = build_optimizer(model, config["lr"])
    diffusion = build_diffusion(config, device)
    precision, precision_why = choose_precision(config["precision"], device)
    compile_model = choose_compile(args.compile, device)
    trained_model = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        trained_model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    train_step = TrainingStep(model, ema_model, optimizer, diffusion, Denoiser(trained_model, compile_model, precision),
                              config["p_uncond"], config["loss_type"], config["ema_decay"], rank, world_size,
                              config["grad_accum"], build_loss_scaler(precision, device))
    return Run(args, config, device, data["train_images"], train_loader, eval_loaders, model, ema_model, optimizer,
               diffusion, train_step, Denoiser(ema_model, compile_model, precision), sampling,
               Reporter(args, rank == 0), decode_s, precision, precision_why, fid_features)


def check_data(args, saved, facts, data_dir):
    """What the data must be, once read: a resumed run's the data its checkpoint was trained on, and --fid_ref_stats
    statistics of it (UserError: nothing has been written yet)."""
    conflicts = data_conflicts(saved["config"], facts) if saved else {}
    if conflicts:
        raise UserError(f"--resume: the data at {data_dir!r} is not what the run was trained on ("
                        + "; ".join(f"{key} {data_text(old)} in the checkpoint, {data_text(new)} here"
                                    for key, (old, new) in conflicts.items())
                        + "); point --data_dir (and --dataset) at the run's data")
    if args.eval_fid and args.fid_ref_stats:
        ref_statistics_file(args.fid_ref_stats, facts)


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
        run.last_saved = (run.args.resume, training_position(state))
    else:
        state = TrainingState()
        state.timing["decode_s"] = run.decode_s
    if run.is_main:
        write_config_json(config, run.files.checkpoint("config.json"))
        if not saved:
            save_forward_strip(run.diffusion, run.train_loader.images[:1], run.files.output("forward_strip"))
    what = (f"resuming '{name}' from {run.args.resume} at epoch {state.epoch + 1}, batch {state.batch_in_epoch}"
            if saved else f"training '{name}'")
    budget, spent_min = config["time_budget_min"], state.timing["train_s"] / 60
    run.report.say(f"{what}: {'conditional' if config['conditional'] else 'unconditional'} DDPM on {run.device}, "
                   f"{run.num_params / 1e6:.2f}M parameters, {data_description(config)} ({config['num_train']} "
                   f"train / {config['num_val']} val / {config['num_test']} test images), T={config['timesteps']} "
                   f"({config['schedule']})"
                   + (f"; {run.world_size} ranks × batch {config['batch_size']}" if run.world_size > 1 else "")
                   + (f"; time budget {budget:g} min: {spent_min:.1f} spent, {max(0, budget - spent_min):.1f} left"
                      if budget else ""))
    run.report.say(compute_description(run))
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


def train_one_epoch(run, state, clock, epoch, signals):
    """The epoch's training steps, from where it stands to its end, or until a signal or the spent time budget
    stops them. Losses stay on the device until a read-out (every --log_interval steps), the only host syncs.
    Returns the epoch's training images per second."""
    config, world_size, steps_per_epoch = run.config, run.world_size, len(run.train_loader)
    run.model.train()
    loss_sum = torch.tensor(state.epoch_loss_sum, device=run.device)
    skipped = torch.zeros((), device=run.device)  # fp16 steps the loss scaler skipped in this epoch
    batches = run.report.batches(run.train_loader.batches(epoch, state.batch_in_epoch), steps_per_epoch,
                                 state.batch_in_epoch, epoch)
    clock.start_epoch()
    interval_start, interval_images, epoch_images = clock.epoch_start, 0, 0
    for x, y in batches:  # x (B, 3, H, W) in [−1, 1], y (B,)
        with clock.step(len(x)):
            # how far along, for the lr decay: by training time under a budget (as the ranks last agreed), else steps
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
        read_out = state.step % run.args.log_interval == 0
        if read_out:
            running = (all_ranks_mean(loss_sum, world_size) / state.batch_in_epoch).item()
            check_finite(running, f"the training loss at epoch {epoch}, step {state.step}")
            now = time.perf_counter()
            run.report.read_out(state.step, epoch, running, lr, interval_images * world_size / (now - interval_start),
                                clock.minutes_left(clock.epoch_seconds()),
                                state.skipped_steps + int(skipped.item()) if run.train_step.scaler else None)
            interval_start, interval_images = now, 0
        if read_out or world_size == 1:
            stop, checkpoint_due = agree_on_stop_and_checkpoint(run, clock, signals)
            if stop:
                break
            if checkpoint_due:
                save_mid_epoch(run, state, clock, loss_sum, skipped)
    state.epoch_loss_sum = all_ranks_mean(loss_sum, world_size).item()  # waits for the device: steps are done
    state.skipped_steps += int(skipped.item())
    epoch_train_s = clock.end_epoch()
    check_finite(state.epoch_loss_sum, f"the training loss of epoch {epoch} (step {state.step})")
    return epoch_images * world_size / max(epoch_train_s, 1e-9)


def agree_on_stop_and_checkpoint(run, clock, signals):
    """Whether to stop inside the epoch (a signal, or the budget spent), and whether last.pt is due
    (--checkpoint_minutes since the last one), decided by all ranks together, which also agree on the budget
    fraction used, so every rank sets the same lr."""
    running_s = clock.epoch_seconds()
    due = time.perf_counter() - run.last_save_time >= run.args.checkpoint_minutes * 60
    signalled, spent, due, clock.agreed_progress = max_over_ranks(
        [signals.received is not None, clock.out_of_time(running_s), due, clock.spent(running_s)], run.world_size)
    return bool(signalled or spent), bool(due)


def save_last(run, state):
    """last.pt where training stands (rank 0 writes it and gets the checkpoint dict back; other ranks None). Every
    rank checks the weights (the same on all), so that NaN weights stop all ranks together and are never written."""
    ckpt, path = None, run.files.checkpoint("last.pt")
    if run.is_main:
        ckpt = run.checkpoint(state)
        save_checkpoint(ckpt, path)
    else:  # nothing to write: only the weights' check
        require_finite_weights({"model": run.model.state_dict(), "ema": run.ema_model.state_dict()})
    run.last_saved, run.last_save_time = (path, training_position(state)), time.perf_counter()
    return ckpt


def save_mid_epoch(run, state, clock, loss_sum, skipped):
    """last.pt inside an epoch (--checkpoint_minutes): the position, the epoch's loss sum and fp16 skips, and the
    training time so far, so that a resume continues from this very step."""
    timing = {**state.timing, "train_s": state.timing["train_s"] + clock.epoch_seconds()}
    snapshot = dataclasses.replace(state, epoch_loss_sum=all_ranks_mean(loss_sum, run.world_size).item(),
                                   skipped_steps=state.skipped_steps + int(skipped.item()), timing=timing)
    save_last(run, snapshot)


def stop_on_signal(run, state, epoch, signal_name):
    """Save last.pt where training stands (mid-epoch included), then stop with the command that resumes."""
    save_last(run, state)
    barrier(run.world_size)
    raise Interrupted(f"{signal_name or 'a signal (on another rank)'} received: stopped after step {state.step} "
                      f"(epoch {epoch}, batch {state.batch_in_epoch}); saved {run.files.checkpoint('last.pt')}. "
                      "Resume with:\n"
                      f"  {resume_command(run.args.argv, resume='auto')}")


def evaluate_epoch(run, state, clock, epoch, train_loss):
    """EMA validation and test losses (fixed t and ε, so epochs compare); on rank 0 the loss JSON and plot and
    the epoch's sample grid. Returns the losses and whether the validation loss is the best so far."""
    config, name = run.config, run.config["run_name"]
    with clock.timed("eval_s"), memory_guard("computing the validation and test losses", "lower --batch_size"):
        run.ema_model.eval()
        losses = {f"{split}_loss": evaluate_loss(run.diffusion, run.ema_denoiser, loader, config["conditional"],
                                                 config["loss_type"]) for split, loader in run.eval_loaders.items()}
    for key, value in losses.items():  # the same on every rank: all stop together
        check_finite(value, f"the {'validation' if key == 'val_loss' else 'test'} loss of epoch {epoch}")
    is_best = state.record_evaluation(epoch, train_loss, losses["val_loss"], losses["test_loss"])
    if run.is_main:
        write_json(state.history, run.files.output("loss_history"))
        plot_loss_history(state.history, run.files.output("loss_curves"), name)
        with clock.timed("sample_s"), memory_guard("sampling the epoch's grid", SAMPLE_REMEDY):
            images, nrow = epoch_grid(run)
            save_grid(images, run.files.output("epoch_grid", epoch=epoch), nrow)
        run.report.grid(state.step, images, nrow)
    return losses, is_best


def epoch_grid(run):
    """The per-epoch grid from fixed noise: conditional, a row per class (with more than MAX_CLASS_ROWS classes, one
    image per class, in rows of about √K); unconditional, 8 × 8. Returns (images, nrow)."""
    num_classes = run.config["num_classes"]
    if not run.config["conditional"]:
        return run.sample(GRID_UNCONDITIONAL, seed=GRID_SEED), 8
    if num_classes <= MAX_CLASS_ROWS:
        per_class, nrow = GRID_PER_CLASS, GRID_PER_CLASS
    else:
        per_class, nrow = 1, math.isqrt(num_classes - 1) + 1  # ⌈√K⌉ columns
    labels = torch.arange(num_classes, device=run.device).repeat_interleave(per_class)
    return run.sample(len(labels), labels, seed=GRID_SEED), nrow


def save_epoch_checkpoints(run, state, is_best):
    """last.pt, and best.pt (without the optimizer) when the validation loss is the best so far."""
    last = save_last(run, state)
    if is_best and run.is_main:
        save_checkpoint(last, run.files.checkpoint("best.pt"), with_optimizer=False)


def finish(run, state, clock):
    """Rank 0 writes the final checkpoint (--save_model), FID (--eval_fid) and the metrics JSON; others wait."""
    if not run.is_main:
        barrier(run.world_size)
        return
    args, config, name, timing = run.args, run.config, run.config["run_name"], state.timing
    if args.save_model:
        save_checkpoint(run.checkpoint(state), run.files.checkpoint("ckpt.pt"))
    images_seen = state.step * config["global_batch_size"]
    metrics = {"world_size": run.world_size, "run_name": name, "device": str(run.device),
               "num_params": run.num_params, "steps": state.step,
               "epochs_done": state.epoch, "batch_size": config["batch_size"], "grad_accum": config["grad_accum"],
               "global_batch_size": config["global_batch_size"], "precision": run.precision,
               "compiled": run.train_step.denoiser.compiled, "fp16_skipped_steps": state.skipped_steps,
               "stopped_by_time_budget": clock.out_of_time(),
               "train_images_per_s": images_seen / timing["train_s"] if timing["train_s"] else None,
               "timing": timing, "final": {k: v[-1] for k, v in state.history.items() if v}}
    if args.eval_fid:
        with clock.timed("fid_s"), memory_guard("computing FID", SAMPLE_REMEDY):
            features, reference = fid_reference(args, config, config["data_dir"], run.train_images, run.device,
                                                run.report.verbose, run.fid_features)
            metrics["fid"] = measure_fid(run.diffusion, run.ema_denoiser, run.sampler, config, args, config["seed"],
                                         features, reference, run.report.verbose)
        metrics.update(fid_samples=args.eval_fid, fid_sampler=run.sampler.describe())
        run.report.scalars(state.step, {"fid": metrics["fid"]})
    write_json(metrics, run.files.output("metrics"))
    run.report.say(f"done: loss history {run.files.output('loss_history')}, checkpoints in {run.files.ckpt_dir}")
    barrier(run.world_size)


def train(args):
    """Train: set up the run, start or resume it, train epoch after epoch until --epochs, a signal (saved; exit
    130) or the time budget stops it, then finish: the final checkpoint, metrics and FID. NaN or infinity stops
    it (exit 1) before anything is written from them."""
    saved = resumed_checkpoint(args)
    run = set_up_run(args, saved)
    config, report = run.config, run.report
    with report:
        state = start_or_resume(run, saved)
        clock = TrainingClock(state.timing, config["time_budget_min"], run.train_step.denoiser.compiled, run.device)
        try:
            with SignalFlag() as signals:
                for epoch in report.epochs(state.epoch, config["epochs"]):
                    with memory_guard(f"training on batches of {config['batch_size']}", BATCH_REMEDY):
                        images_per_s = train_one_epoch(run, state, clock, epoch, signals)
                    interrupted, budget_spent = (bool(v) for v in max_over_ranks(
                        [signals.received is not None, clock.out_of_time()], run.world_size))
                    if interrupted:
                        stop_on_signal(run, state, epoch, signals.received)
                    evaluated = epoch == config["epochs"] or epoch % args.eval_every == 0 or budget_spent
                    train_loss = state.epoch_loss_sum / max(1, state.batch_in_epoch)
                    losses, is_best = (evaluate_epoch(run, state, clock, epoch, train_loss) if evaluated
                                       else (None, False))
                    state.finish_epoch(epoch)
                    if evaluated or epoch % args.checkpoint_every == 0:
                        save_epoch_checkpoints(run, state, is_best)
                    report.epoch_done(epoch, state.step, train_loss, losses, images_per_s)
                    if budget_spent:
                        report.say(f"time budget of {config['time_budget_min']:g} min spent after epoch {epoch} "
                                   f"(step {state.step}): finishing")
                        break
            finish(run, state, clock)
        except NonFiniteError as e:
            raise TrainingError(diverged_message(run, e)) from None
        except WriteError as e:
            raise TrainingError(write_failed_message(run, e)) from None


def resumed_checkpoint(args):
    """The checkpoint --resume names (None for a new run), once the command line is checked against it; fills in
    --run_name (the checkpoint's when --resume names a path)."""
    if not args.resume:
        args.run_name = args.run_name or "DDPM"
        return None
    path, saved = load_resumable(args.resume, args.models_dir, args.run_name or "DDPM")
    args.run_name = args.run_name or stored_run_name(saved["config"], path)
    config = saved["config"]
    check_run_memory(args, UNetConfig.from_dict(config["model"]), config["timesteps"], config["image_size"],
                     max(GRID_UNCONDITIONAL, args.eval_fid), training=True, guided=False)
    conflicts = fixed_setting_conflicts(config, vars(args), args.given)
    if conflicts:
        given = ", ".join(f"--{key} {flag_text(value)}" for key, (_, value) in conflicts.items())
        kept = ", ".join(f"{key} {flag_text(saved_value)}" for key, (saved_value, _) in conflicts.items())
        raise UserError(f"--resume: {given} differ from the run being resumed ({kept}); what the run trains cannot "
                        "change mid-run: drop them, or start a new run under another --run_name")
    args.resume = path
    return saved


def stored_run_name(config, path):
    """The run name a checkpoint's config carries, made a valid one (with a note) when it is not: an older or foreign
    file's name never chooses where files go."""
    stored = config.get("run_name")
    name = sanitized_run_name(stored)
    if name != stored:
        print(f"note: {path!r} carries the run name {str(stored)!r:.80}, which is not a valid one "
              f"({RUN_NAME_CHARACTERS}); its files are named {name!r}", file=sys.stderr)
    return name


def flag_text(value):
    """A setting's value as it is written on the command line (lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# ------------------------------------------------------------------------------- inference

def class_cycle(classes, n, device):
    """The given class indices repeated to length n, as a LongTensor (n,)."""
    return torch.tensor(classes, dtype=torch.long).repeat(math.ceil(n / len(classes)))[:n].to(device)


def check_against_model(args, config):
    """Inference flags that the checkpoint's config can contradict (exit status 2, nothing written)."""
    num_classes = config.get("num_classes")
    if args.conditional and num_classes is None:
        raise UserError(f"--conditional was given but {args.model_path!r} is an unconditional model; "
                        "drop --conditional or use a checkpoint trained with --conditional")
    if args.guidance_sweep and num_classes is None:
        raise UserError(f"--guidance_sweep needs a conditional model; {args.model_path!r} is unconditional")
    if args.sample_classes:  # now with a conditional model (check_flag_combinations)
        args.sample_classes = class_indices(args.sample_classes, config["classes"])
    if num_classes is not None and not args.conditional:
        print("note: conditional checkpoint sampled without --conditional: drawing unconditional samples "
              "(null label); add --conditional for class-guided samples", file=sys.stderr)


def write_guidance_sweep(args, diffusion, denoiser, settings, config):
    """One labelled grid: a row per --guidance_sweep scale, a column per class, every row from the same noise."""
    classes = args.sample_classes or list(range(min(config["num_classes"], MAX_CLASS_ROWS)))
    images = guidance_sweep(diffusion, denoiser, settings, args.guidance_sweep, classes, config["image_size"],
                            config["model"]["channels"], args.seed)
    images = crop_to_data(images, trained_data(config)["data_size"])
    os.makedirs(args.save_dir, exist_ok=True)
    path = run_files(args).output("guidance_sweep")
    save_labelled_grid(images, path, [f"w = {w:g}" for w in args.guidance_sweep],
                       [config["classes"][c] for c in classes])
    if not args.quiet:
        print(f"guidance sweep ({len(args.guidance_sweep)} scales × {len(classes)} classes): {path}", flush=True)


def save_samples(args, images, labels, config, seconds, device):
    """samples_<run>.png (conditional: a column per class), one PNG per image, and the uint8 npz."""
    os.makedirs(args.save_dir, exist_ok=True)
    files = run_files(args)
    columns = len(args.sample_classes or range(config["num_classes"])) if labels is not None else None
    if columns is not None and columns <= MAX_CLASS_ROWS:
        nrow = min(columns, args.num_samples)  # a column per class
    else:
        nrow = math.ceil(math.sqrt(args.num_samples))
    save_grid(images, files.output("samples_grid"), nrow)
    save_individual_pngs(images, files.output("samples_folder"), labels, config.get("classes"))
    with atomic_open(files.output("samples_npz")) as f:
        np.savez(f, images=to_uint8(images))
    if not args.quiet:
        print(f"{args.num_samples} samples in {seconds:.1f} s on {device}: grid {files.output('samples_grid')}, "
              f"PNGs in {files.output('samples_folder')}/", flush=True)


def inference(args):
    """Sample from a checkpoint: a grid, a PNG per image and an npz (or, with --guidance_sweep, one labelled
    grid); then FID with --eval_fid."""
    device = pick_device(args)
    ckpt = load_checkpoint(args.model_path)
    config = ckpt["config"]
    args.run_name = args.run_name or stored_run_name(config, args.model_path)
    settings = sampler_settings(args, saved_sampler_settings(config), config["timesteps"])
    kept = len(args.guidance_sweep) * MAX_CLASS_ROWS if args.guidance_sweep else args.num_samples + args.eval_fid
    check_run_memory(args, UNetConfig.from_dict(config["model"]), config["timesteps"], config["image_size"], kept,
                     training=False, guided=args.conditional and settings.guidance_scale not in (0, 1))
    check_against_model(args, config)
    precision, precision_why = choose_precision(args.precision, device)
    model = sampling_model(ckpt).to(device, memory_format=torch.channels_last).eval()
    denoiser = Denoiser(model, choose_compile(args.compile, device), precision)
    diffusion = build_diffusion(config, device)
    if not args.quiet:
        print(f"sampling on {device} in {describe_precision(precision)} ({precision_why}"
              f"{', compiled' if denoiser.compiled else ''}): {settings.describe()}", flush=True)
    torch.manual_seed(args.seed)
    if args.guidance_sweep:
        return write_guidance_sweep(args, diffusion, denoiser, settings, config)
    start = time.perf_counter()
    if args.eval_fid:  # the reference first: one of another dataset stops before anything is written
        features, reference = fid_reference(args, config, args.data_dir or config["data_dir"], None, device,
                                            not args.quiet)
    reference_s = time.perf_counter() - start

    labels = None
    if args.conditional:
        labels = class_cycle(args.sample_classes or list(range(config["num_classes"])), args.num_samples, device)
    start = time.perf_counter()
    with memory_guard(f"sampling {args.num_samples} images", SAMPLE_REMEDY):
        images = sample_images(diffusion, denoiser, settings, config, args.num_samples, labels, args.sample_batch,
                               progress=not args.quiet and stderr_is_terminal())
    require_finite(images, "the samples")
    save_samples(args, images, labels, config, time.perf_counter() - start, device)
    if args.eval_fid:
        start = time.perf_counter()
        fid = measure_fid(diffusion, denoiser, settings, config, args, args.seed, features, reference, not args.quiet)
        write_json({"run_name": args.run_name, "model_path": args.model_path, "fid": fid, "fid_samples": args.eval_fid,
                    "fid_sampler": settings.describe(), "conditional": args.conditional,
                    "fid_s": reference_s + time.perf_counter() - start, "device": str(device),
                    "precision": precision},
                   run_files(args).output("metrics"))


def flags_given(parser, args, argv):
    """The names (dests) of the flags given on the command line, as opposed to those left at their defaults: argv
    parsed again into a namespace whose every entry is already set, so that argparse fills in no default."""
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return frozenset(name for name, value in vars(given).items() if value is not unset)


def failure_text(e):
    """How main reports an exception it stops on: one line (the resume command on a second)."""
    if isinstance(e, Interrupted):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C); files already written stay, nothing is half-written"
    if isinstance(e, NonFiniteError):
        return f"error: {e}; nothing was written from them"
    if isinstance(e, (WriteError, OutOfMemory)):
        return f"error: {e}"
    if isinstance(e, OSError):
        return f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    return f"error: {e}"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.given = flags_given(parser, args, args.argv)
    check_args(args, parser)
    args.rank, args.world_size, args.local_rank = (0, 1, 0) if args.inference else \
        init_distributed(torch.cuda.is_available() and not args.no_cuda)
    try:
        with memory_guard("inference" if args.inference else "training", "lower --sample_batch, --batch_size or --dim"):
            inference(args) if args.inference else train(args)
    except (UserError, TrainingError, NonFiniteError, WriteError, OutOfMemory, Interrupted, KeyboardInterrupt,
            OSError) as e:
        if args.rank == 0:
            print(f"{parser.prog}: {failure_text(e)}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 130 if isinstance(e, (Interrupted, KeyboardInterrupt)) else 1)
    finally:
        if args.world_size > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
