"""Train a DDPM on CIFAR-10 (unconditional, or class-conditional with classifier-free guidance), or on CIFAR-100,
MNIST, Fashion-MNIST or any folder of images, and sample from a saved checkpoint.

    python ddpm_main.py --epochs 30 --save_model --run_name DDPM_30epochs
    python ddpm_main.py --conditional --epochs 30 --p_uncond 0.1 --save_model --run_name DDPM_cond
    python ddpm_main.py --inference --model_path models/DDPM_30epochs/ckpt.pt --num_samples 64
"""
import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import time

import torch

from ddpm_checkpoint import (COMMAND_LINE_SETTINGS, MODEL_SETTINGS, SEED_RANGE, TOOL_VERSION, check_fixed_settings,
                             check_run_memory, flag_value, imported_checkpoint, load_resumable, load_sampling_model,
                             save_checkpoint, saved_sampler_settings, stored_run_name, trained_data, training_config,
                             write_config_json)
from ddpm_data import (CIFAR10_CLASSES, DATASETS, DEFAULT_DATA_DIR, check_stage_count, image_size_of, model_side,
                       require_image_folder)
from ddpm_diffusion import (DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLING_STEPS, LOSS_TYPES, PREDICTIONS, SAMPLERS,
                            SCHEDULES, SPACINGS, VARIANCES, SamplerSettings)
from ddpm_download import fetched
from ddpm_fid import INCEPTION, IS_SPLITS, REFERENCE_SPLITS, InceptionFeatures, ref_statistics_file
from ddpm_helpers import (COMPILE_CHOICES, PRECISIONS, STOPPING_ERRORS, NonFiniteError, RunFiles, TrainingError,
                          UserError, WriteError, check_run_name, check_writable_folder, exit_status,
                          failure_text, init_distributed, memory_guard, require_finite, sanitized_run_name,
                          stderr_is_terminal, write_folder, write_json)
from ddpm_interop import (FORMAT_NAMES, HUB_FOLDER, PUBLISHED, diffusers_folder_files, export_problem,
                          import_weights, read_foreign)
from ddpm_model import ARCHITECTURES, RESBLOCKS, UNetConfig
from ddpm_presets import PRESETS, presets_help
from ddpm_run import (EVAL_IMAGES, GRID_PER_CLASS, GRID_UNCONDITIONAL, SAMPLE_REMEDY, SignalFlag, StopRequested,
                      TrainingOptions, diverged_message, finish, set_up_run, start_or_resume, stop_on_signal,
                      train_epochs, write_failed_message)
from ddpm_sample import (MAX_CLASS_ROWS, STRIP_COLUMNS, STRIP_ROWS, class_cycle, class_indices, fid_reference,
                         grayscale_fid_note, measure_fid_and_is, measure_nll, nll_test_images, parse_classes,
                         prepare_sampler, save_samples, write_denoising_strip, write_guidance_sweep)
from ddpm_train import LR_DECAYS, LOG_LINE_SECONDS, WALL_PARTS

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


def noise_interval(text):
    """--guidance_interval: 'LO,HI', two noise levels 0 ≤ LO < HI (HI may be inf), or 'all' (every step)."""
    if text.strip() == "all":
        return (0.0, math.inf)
    try:
        interval = tuple(float(v) for v in text.split(","))
        SamplerSettings(guidance_interval=interval)  # the one check of what an interval may be
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 ≤ LO < HI (HI may be inf), or all; got {text!r}") \
            from None
    return interval


def build_parser():
    p = ArgumentParser(prog="ddpm_main.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"%(prog)s {TOOL_VERSION} (ddpm-cifar10), torch {torch.__version__}")
    g = p.add_argument_group("training")
    g.add_argument("--preset", choices=PRESETS, help="a named recipe: sets the flags it names, unless they are given "
                   f"too (a new training run only). {presets_help()}")
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
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW's decoupled weight decay (0: Adam)")
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
    g.add_argument("--architecture", choices=ARCHITECTURES, default="compact",
                   help="the U-Net: compact, this tool's (channels change in the resampling convolutions, one "
                   "attention per stage); ddpm, Ho et al.'s (channels change in a stage's first block, attention after "
                   "every block, one block more per up-stage, 3 × 3 strided down-sampling)")
    g.add_argument("--dim", type=int, default=32, help="U-Net base channels, a multiple of --groups")
    g.add_argument("--dim_mults", type=int_list, default="1,2,4",
                   help="U-Net channel multipliers, one per stage; each stage after the first halves the image")
    g.add_argument("--num_res_blocks", type=int, default=2,
                   help="ResNet blocks per stage on the way down (ddpm: one more on the way up)")
    g.add_argument("--attn_resolutions", type=int_list, metavar="SIDE,...",
                   help="image sides whose stages get self-attention, e.g. 16 (default: every stage after the first)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout before each ResNet block's second convolution")
    g.add_argument("--resblock", choices=RESBLOCKS, default="film",
                   help="how the time (and class) embedding enters a ResNet block: film, a scale and shift after its "
                   "second GroupNorm; add, added after its first convolution (Ho et al.)")
    g.add_argument("--groups", type=int, default=UNetConfig.groups, help="GroupNorm groups of the U-Net")
    g.add_argument("--norm_eps", type=float, default=UNetConfig.norm_eps,
                   help="GroupNorm's ε, added to the variance it divides by (Ho et al.: 1e-6)")
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
                   help=f"epochs between validation/test losses (on {EVAL_IMAGES:,} images of each split), grids and "
                   "plots (the last epoch always)")
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
                   help="the whole run's wall-clock minutes, evaluation, pictures, checkpoints and --eval_fid / "
                   "--eval_nll included (a resumed run counts what it used before): training stops when what is left "
                   "covers only the end-of-run work, estimated from the measured speed (default: no limit)")
    g.add_argument("--tensorboard", metavar="DIR",
                   help="also log to TensorBoard in DIR: loss and lr at read-outs, img/s, validation/test losses, "
                   "FID and the per-epoch grids (needs the tensorboard package; view with tensorboard --logdir DIR)")

    g = p.add_argument_group("inference")
    g.add_argument("--inference", action="store_true", help="sample from --model_path instead of training")
    g.add_argument("--model_path", help="checkpoint to sample from")
    g.add_argument("--num_samples", type=int,
                   help="images to generate (default: whole rows, 8 of each class for a conditional model, else 64; "
                   "with --eval_fid only FID's samples unless this is given)")
    g.add_argument("--sample_classes", help="comma list of class indices or names (e.g. 3,5 or cat,dog), cycled to "
                   f"--num_samples (default: all the model's classes; a sweep's first {MAX_CLASS_ROWS})")
    g.add_argument("--guidance_sweep", type=float_list, metavar="W,W,...",
                   help="write one grid: a row per guidance scale, a column per class, from the same noise")
    g.add_argument("--denoising_strip", action="store_true",
                   help=f"write one grid instead of samples: a row per sample ({STRIP_ROWS}, or --num_samples), x̂_0 "
                   f"as the network predicts it at {STRIP_COLUMNS} evenly spaced steps of the sampler, x_T to x_0")

    g = p.add_argument_group(
        "sampling (inference, the per-epoch grids and FID)",
        "Every checkpoint carries the settings it samples with: training stores these flags (or their\n"
        "defaults), and inference uses the checkpoint's unless a flag says otherwise. A --sampler other than\n"
        "the checkpoint's starts from that sampler's defaults (the guidance scale and interval and the\n"
        "variance stay the checkpoint's).")
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
    g.add_argument("--guidance_interval", type=noise_interval, metavar="LO,HI|all",
                   help="apply w only at noise levels LO < σ_t ≤ HI, σ_t = √(1−ᾱ_t)/√ᾱ_t (EDM's σ), and the plain "
                   "conditional prediction elsewhere, one forward instead of two (Kynkäänniemi et al. 2024); all: "
                   "every step (the default where the checkpoint names no interval)")
    g.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic (default), 1 like DDPM")
    g.add_argument("--variance", choices=VARIANCES,
                   help="σ_t² of --sampler ddpm's steps: posterior, β̃_t (the default where the checkpoint names "
                   "none), or beta, β_t (Ho et al.'s CIFAR-10 samples; what an imported paper model carries)")
    g.add_argument("--sample_batch", type=int, default=1000, help="images generated per forward batch")

    g = p.add_argument_group("FID (Fréchet Inception Distance) and Inception Score")
    g.add_argument("--eval_fid", type=int, default=0, metavar="N",
                   help="after training, or with --inference: FID and Inception Score of N samples (class-balanced "
                   "when conditional), from one pass of torch-fidelity's Inception-v3; published figures use 50,000")
    g.add_argument("--fid_inception", metavar="PATH",
                   help=f"torch-fidelity's Inception-v3 weights file ({INCEPTION.file_name}) (default: fetched on "
                   "first use into $TORCH_HOME/hub/checkpoints and checked by SHA-256)")
    g.add_argument("--fid_ref", choices=REFERENCE_SPLITS, default="train",
                   help="the split whose statistics FID compares with: train, as Ho et al., or test")
    g.add_argument("--fid_ref_stats", metavar="NPZ",
                   help="reference statistics (mu, sigma) instead of computing them from the --fid_ref split")

    g = p.add_argument_group("likelihood (the variational bound, Ho et al. eq. 5)")
    g.add_argument("--eval_nll", type=int, default=0, metavar="N",
                   help="after training (null label), or with --inference instead of sampling (--conditional: with "
                   "the images' labels): the bound on N test images (spread over the split) in bits/dim, each term per t to "
                   "nll_<run>.json and a plot; T network evaluations per image, --sample_batch images at a time")
    g.add_argument("--nll_variance", choices=VARIANCES,
                   help="σ_t² of p_θ(x_{t−1} | x_t) in the bound: posterior, β̃_t, or beta, β_t (default: the "
                   "sampling settings' --variance, posterior where they name none)")

    g = p.add_argument_group(
        "foreign weights",
        "Ho et al.'s published CIFAR-10 model in, diffusers out (README: 'Sample the paper's own model').")
    g.add_argument("--import_weights", metavar="PATH|NAME",
                   help="make <models_dir>/<run_name>/ckpt.pt of Ho et al.'s network from pesser/pytorch_diffusion's "
                   "state dict (model-790000.ckpt) or a diffusers UNet2DModel folder (e.g. google/ddpm-cifar10-32), "
                   f"or from a file fetched by name once ({', '.join(PUBLISHED)}); it samples as the paper did "
                   "(1,000 ancestral steps, σ_t² = β_t) unless sampling flags are given")
    g.add_argument("--export_diffusers", metavar="DIR",
                   help="write --model_path's network (the architecture ddpm; its EMA weights) as a diffusers "
                   "DDPMPipeline folder that DDPMPipeline.from_pretrained(DIR) loads")

    g = p.add_argument_group("general")
    g.add_argument("--run_name", help="names the checkpoint folder and output files (default: DDPM; at inference "
                   "the --model_path folder's name for a ckpt.pt, last.pt or best.pt, else the file's)")
    g.add_argument("--save_dir", default="outputs", help="folder for grids, samples and JSON")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed, same results on CPU)")
    g.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help="torch.compile the U-Net for training, grids, inference and FID: auto on CUDA only; on: on "
                   "the CPU too (through inductor: minutes of compiling, no faster on a 2-core CPU); off: eager")
    g.add_argument("--no_compile", action="store_true", help="the same as --compile off")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="what the U-Net computes in, for training and sampling (weights, EMA, optimizer and "
                   "checkpoints stay float32): auto is bf16 autocast where the hardware has bf16 (CUDA compute "
                   "capability ≥ 8.0, CPUs with AVX512-BF16 or AMX), fp16 autocast with a dynamic loss scaler on older "
                   "CUDA GPUs, else fp32")
    g.add_argument("--no_bf16", action="store_true", help="the same as --precision fp32 (kept for older scripts)")
    g.add_argument("--no_cuda", action="store_true", help="run on CPU even when CUDA is available")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


AT_LEAST_ONE = ("epochs", "batch_size", "grad_accum", "timesteps", "num_samples", "log_interval", "sample_batch",
                "dim", "eval_every", "checkpoint_every", "sampling_steps", "num_res_blocks", "groups")
NUMBER_RANGES = [  # (flag, test, what the value must be) for the flags that are not off (None)
    *((name, lambda v: v >= 1, "at least 1") for name in AT_LEAST_ONE),
    ("lr", lambda v: v > 0, "greater than 0"),
    ("p_uncond", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("min_snr_gamma", lambda v: v > 0, "greater than 0"),
    ("warmup_steps", lambda v: v >= 0, "0 or more"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("eval_nll", lambda v: v >= 0, "0 (off) or an image count"),
    ("eta", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("guidance_scale", lambda v: v >= 0, "0 or more"),
    ("checkpoint_minutes", lambda v: v > 0, "greater than 0"),
    ("time_budget_min", lambda v: v > 0, "greater than 0"),
    ("eval_fid", lambda v: v == 0 or v >= IS_SPLITS, f"0 (off) or a sample count of at least {IS_SPLITS} (the "
     "Inception Score's splits)"),
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
    """Every number finite and in its range (--guidance_interval, whose HI may be inf, is checked by its type); the
    U-Net's width and stages ones it can be built with."""
    for name, value in vars(args).items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise UserError(f"--{name} must be finite, got {value}")
    for name, in_range, must in NUMBER_RANGES:
        value = getattr(args, name)
        if value is not None and not in_range(value):
            raise UserError(f"--{name} must be {must}, got {value}")
    if args.dim % args.groups:
        raise UserError(f"--dim must be a multiple of --groups {args.groups} (the U-Net's GroupNorm groups), "
                        f"got {args.dim}")
    if any(m < 1 for m in args.dim_mults):
        raise UserError(f"--dim_mults must be positive integers, got {args.dim_mults}")
    if args.guidance_sweep is not None and (not args.guidance_sweep or min(args.guidance_sweep) < 0):
        raise UserError("--guidance_sweep needs non-negative guidance scales, e.g. 0,1,3,5,7")
    if args.sample_classes is not None:
        args.sample_classes = parse_classes(args.sample_classes)


def check_flag_combinations(args):
    """Flags that need others, or that belong to another job (training, inference, import or export)."""
    check_foreign_weights_flags(args)
    if args.inference and not args.model_path:
        raise UserError("--inference needs --model_path (a checkpoint written by training with this tool)")
    if args.resume is not None and args.inference:
        raise UserError("--resume continues training; for sampling use --inference --model_path")
    if args.job == "train" and args.resume is None:  # a new run's model is known: check its sampling flags now
        sampler_settings(args, None, args.timesteps)
    if args.sample_classes is not None and not (args.inference and (args.conditional or args.guidance_sweep)):
        raise UserError("--sample_classes picks the classes of class-guided samples: it goes with --inference "
                        "--conditional (or --guidance_sweep)")
    if args.guidance_sweep is not None and not args.inference:
        raise UserError("--guidance_sweep goes with --inference (it samples from a trained model)")
    if args.denoising_strip and not args.inference:
        raise UserError("--denoising_strip goes with --inference (it samples from a trained model)")
    jobs = [flag for flag, asked in (("--guidance_sweep", args.guidance_sweep is not None),
                                     ("--denoising_strip", args.denoising_strip), ("--eval_nll", args.eval_nll),
                                     ("--eval_fid", args.eval_fid)) if asked]
    if args.inference and len(jobs) > 1:
        raise UserError(f"{' and '.join(jobs)} are separate jobs at inference: give one per command")
    if "nll_variance" in args.given and not args.eval_nll:
        raise UserError("--nll_variance chooses σ_t² in the bound of --eval_nll N; give --eval_nll too")
    resolve_synonyms(args)
    fid_flags = [f"--{name}" for name in ("fid_inception", "fid_ref", "fid_ref_stats") if name in args.given]
    if fid_flags and not args.eval_fid:
        raise UserError(f"{' and '.join(fid_flags)} {'set' if len(fid_flags) > 1 else 'sets'} up the FID of "
                        "--eval_fid N; give --eval_fid too")
    if "fid_ref" in args.given and args.fid_ref_stats:
        raise UserError("--fid_ref picks the split whose statistics are computed, --fid_ref_stats gives statistics "
                        "instead: give one of them")
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
    for flag, path in (("--fid_inception", args.fid_inception), ("--fid_ref_stats", args.fid_ref_stats)):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path!r} is not a file")
    folders = {"--save_dir": args.save_dir, "--export_diffusers": args.export_diffusers}
    if args.job in ("train", "import"):
        folders.update({"--models_dir": args.models_dir, "--tensorboard": args.tensorboard})
    for flag, folder in folders.items():
        if folder is not None:
            check_writable_folder(folder, flag)
    if args.job == "train" and args.resume is None:
        data_dir = args.data_dir or DEFAULT_DATA_DIR
        if args.dataset == "folder":
            require_image_folder(data_dir)
        image_size = image_size_of(data_dir, args.dataset)
        check_stage_count(args.dim_mults, image_size)
        # a lower bound: one channel, no classes (the data is not read yet), no attention, the unconditional grid
        model = UNetConfig(dim=args.dim, dim_mults=tuple(args.dim_mults), channels=1, architecture=args.architecture,
                           num_res_blocks=args.num_res_blocks, attn_resolutions=(), groups=args.groups)
        check_run_memory(pick_device(args), args.sample_batch, model, args.timesteps,
                         model_side(image_size or (1, 1), len(args.dim_mults)), max(GRID_UNCONDITIONAL, args.eval_fid),
                         training=True, guided=False)


def check_foreign_weights_flags(args):
    """--import_weights and --export_diffusers are jobs of their own; export needs --model_path and a new folder."""
    others = [flag for flag, given in (("--inference", args.inference), ("--resume", args.resume is not None),
                                       ("--preset", args.preset is not None),
                                       ("--export_diffusers", args.export_diffusers is not None)) if given]
    if args.import_weights is not None and others:
        raise UserError(f"--import_weights is a job of its own: drop {' and '.join(others)} (sample the imported "
                        "model with --inference --model_path <models_dir>/<run_name>/ckpt.pt)")
    if args.export_diffusers is not None:
        if not args.model_path or args.inference or args.resume is not None:
            raise UserError("--export_diffusers DIR writes the network of --model_path CKPT: give --model_path, "
                            "without --inference or --resume")
        if os.path.exists(args.export_diffusers) and not (os.path.isdir(args.export_diffusers)
                                                          and not os.listdir(args.export_diffusers)):
            raise UserError(f"--export_diffusers {args.export_diffusers!r} exists and is not an empty folder; "
                            "name a new one")


def job_of(args):
    """What the command does: 'import', 'export', 'inference' or 'train'."""
    if args.import_weights is not None:
        return "import"
    if args.export_diffusers is not None:
        return "export"
    return "inference" if args.inference else "train"


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
    from that sampler's defaults, keeping the saved guidance scale and interval and the variance. Steps are filled in
    for T."""
    base = saved or SamplerSettings()
    if args.sampler is not None and args.sampler != base.sampler:
        base = SamplerSettings(args.sampler, guidance_scale=base.guidance_scale,
                               guidance_interval=base.guidance_interval, variance=base.variance)
    given = {field: getattr(args, flag) for field, flag in (("sampler", "sampler"), ("steps", "sampling_steps"),
                                                           ("spacing", "spacing"), ("eta", "eta"),
                                                           ("guidance_scale", "guidance_scale"),
                                                           ("guidance_interval", "guidance_interval"),
                                                           ("variance", "variance"))
             if getattr(args, flag) is not None}
    settings = dataclasses.replace(base, **given)
    if settings.sampler == "ddpm" and args.sampling_steps is not None:
        raise UserError("--sampling_steps applies to --sampler dpm++2m and ddim (ddpm always runs all T steps)")
    if settings.sampler != "dpm++2m" and args.spacing is not None:
        raise UserError(f"--spacing applies to --sampler dpm++2m (the sampler here is {settings.sampler}: ddim "
                        "spaces its steps evenly in t, ddpm runs all T)")
    if settings.sampler != "ddim" and args.eta is not None:
        raise UserError(f"--eta applies to --sampler ddim (the sampler here is {settings.sampler})")
    if settings.sampler != "ddpm" and args.variance is not None and "variance" in args.given:  # not a preset's
        raise UserError(f"--variance applies to --sampler ddpm (the sampler here is {settings.sampler}: its steps "
                        "are deterministic or set by --eta)")
    try:
        return settings.for_timesteps(timesteps)
    except ValueError:  # steps > T (check_args rejects steps < 1)
        raise UserError(f"--sampling_steps {settings.steps} is more than the model's T = {timesteps}") from None


# ----------------------------------------------------------------------------------- train

def train(args):
    """Train: set up the run, start or resume it, train epoch after epoch until --epochs, a signal (saved; exit
    130) or the time budget stops it (ddpm_run.train_epochs), then finish: the final checkpoint, metrics and FID. NaN
    or infinity stops it (exit 1) before anything is written from them."""
    saved = resumed_checkpoint(args)
    run = set_up_run(command_line_settings(args, saved), args.given, training_options(args), saved)
    with run.report:
        state = start_or_resume(run, saved)
        with SignalFlag(immediate=run.world_size == 1) as run.signals:
            try:
                train_epochs(run, state, run.clock)
                finish(run, state, run.clock)
            except StopRequested as e:
                stop_on_signal(run, state, str(e))
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
    check_run_memory(pick_device(args), args.sample_batch, UNetConfig.from_dict(config["model"]), config["timesteps"],
                     config["image_size"], max(GRID_UNCONDITIONAL, args.eval_fid), training=True, guided=False)
    check_fixed_settings(config, vars(args), args.given)
    check_budget_left(saved, args)
    args.resume = path
    return saved


def check_budget_left(saved, args):
    """UserError, saying how to give more time, when a resumed run's time budget is spent: the time budget stopped it
    and the budget is not raised, or the budget is no more than the wall time the run has used."""
    budget = args.time_budget_min if "time_budget_min" in args.given else saved["config"]["time_budget_min"]
    if not budget:
        return
    timing = {key: value for key, value in saved["timing"].items() if isinstance(value, (int, float))}
    used_min = (timing.get("wall_s") or sum(timing.get(key, 0.0) for key in WALL_PARTS)) / 60
    stopped = saved.get("budget_spent") is True and budget <= (saved["config"]["time_budget_min"] or 0)
    if stopped or used_min >= budget:
        raise UserError(f"--resume: the time budget is spent ({used_min:.1f} min used of --time_budget_min "
                        f"{budget:g}, which counts the whole run); to train on, give a larger total, e.g. "
                        f"--time_budget_min {math.ceil(used_min + budget):g}")


def command_line_settings(args, saved):
    """The config's settings as the command line gives them (ddpm_checkpoint.training_config resolves them against a
    resumed run's checkpoint `saved`), the sampling settings resolved for the run's T."""
    sampling = (sampler_settings(args, saved_sampler_settings(saved["config"]), saved["config"]["timesteps"])
                if saved else sampler_settings(args, None, args.timesteps))
    return {**{key: getattr(args, key) for key in COMMAND_LINE_SETTINGS}, "sampling": sampling}


def training_options(args):
    """How the run goes about its training (ddpm_run.TrainingOptions): its files, device and command line, and the
    flags of the options' names."""
    named = {field.name for field in dataclasses.fields(TrainingOptions)} - {"files", "device", "command_line"}
    return TrainingOptions(run_files(args), pick_device(args), tuple(args.argv),
                           **{name: getattr(args, name) for name in named})


# ------------------------------------------------------------------------------- inference

def inference(args):
    """Sample from a checkpoint: a grid, a PNG per image and an npz, then FID with --eval_fid; or instead one labelled
    grid (--guidance_sweep, --denoising_strip), or the bound in bits/dim of test images (--eval_nll)."""
    device = pick_device(args)
    ckpt, model = load_sampling_model(args.model_path)
    config = ckpt["config"]
    args.run_name = args.run_name or inference_run_name(args.model_path, config)
    files, verbose = run_files(args), not args.quiet
    settings = sampler_settings(args, saved_sampler_settings(config), config["timesteps"])
    check_against_model(args, config, settings)
    args.nll_variance = args.nll_variance or settings.variance  # the bound's σ_t²: the sampler's unless given
    job = (("computing the bound", f"all {config['timesteps']} steps of p_θ, σ_t² {args.nll_variance}") if args.eval_nll
           else ("sampling", settings.describe(guided=args.conditional)))
    sampler = prepare_sampler(model, config, settings, device, args.precision, args.compile, args.sample_batch, verbose,
                              job)
    torch.manual_seed(args.seed)
    if args.guidance_sweep:
        return write_guidance_sweep(sampler, args.guidance_sweep, args.sample_classes, args.seed, files, verbose)
    classes = (args.sample_classes or list(range(config["num_classes"]))) if args.conditional else None
    if args.denoising_strip:
        rows = args.num_samples if "num_samples" in args.given else STRIP_ROWS
        return write_denoising_strip(sampler, rows, classes, args.seed, files, verbose)
    if args.eval_nll:
        images, labels = nll_test_images(config, args.data_dir or config["data_dir"], args.dataset, args.eval_nll,
                                         args.conditional)
        return measure_nll(sampler, images, labels, args.nll_variance, args.seed, files, verbose)
    start = time.perf_counter()
    if args.eval_fid:  # the reference first: one of another dataset stops before anything is written
        features, reference = inference_fid_reference(args, config, device)
    reference_s = time.perf_counter() - start
    if "num_samples" in args.given or not args.eval_fid:  # --eval_fid alone writes FID's samples only
        num_samples = args.num_samples or whole_rows(classes)
        labels = class_cycle(classes, num_samples, device) if classes else None
        start = time.perf_counter()
        with memory_guard(f"sampling {num_samples} images", SAMPLE_REMEDY):
            images = sampler.sample(num_samples, labels, progress=verbose and stderr_is_terminal())
        require_finite(images, "the samples")
        save_samples(sampler, images, labels, files, len(classes) if classes else None, time.perf_counter() - start,
                     verbose)
    if args.eval_fid:
        start = time.perf_counter()
        os.makedirs(files.save_dir, exist_ok=True)
        measured = measure_fid_and_is(sampler, args.eval_fid, args.seed, features, reference,
                                      files.output("fid_samples"), verbose)
        write_json({"run_name": args.run_name, "model_path": args.model_path, **measured,
                    "conditional": args.conditional, "fid_s": reference_s + time.perf_counter() - start,
                    "device": str(device), "precision": sampler.denoiser.precision}, files.output("metrics"))


def inference_run_name(model_path, config):
    """What inference names its outputs: the name the user sees in --model_path, the run folder of a file the tool
    wrote (models/<name>/ckpt.pt → <name>), else the file's own (downloads/ho2020.pt → ho2020); the checkpoint's stored
    run name where that is not a valid run name."""
    path = os.path.abspath(model_path)
    name = os.path.basename(os.path.dirname(path)) if os.path.basename(path) in CHECKPOINT_FILES else \
        os.path.splitext(os.path.basename(path))[0]
    return name if sanitized_run_name(name) == name else stored_run_name(config, model_path)


CHECKPOINT_FILES = ("ckpt.pt", "last.pt", "best.pt")  # what training writes into models/<run_name>/


def whole_rows(classes):
    """The default --num_samples: a grid of whole rows, GRID_PER_CLASS rows of a column per class (at most
    MAX_CLASS_ROWS classes; with more, one image of each), else GRID_UNCONDITIONAL (8 × 8)."""
    if classes is None:
        return GRID_UNCONDITIONAL
    return len(classes) * GRID_PER_CLASS if len(classes) <= MAX_CLASS_ROWS else len(classes)


def check_against_model(args, config, settings):
    """Inference flags that the checkpoint's config can contradict, and what they ask of memory for this model sampled
    with these settings (exit status 2, nothing written)."""
    kept = len(args.guidance_sweep) * MAX_CLASS_ROWS if args.guidance_sweep else \
        (args.num_samples or whole_rows(config["classes"] if args.conditional else None)) + args.eval_fid
    check_run_memory(pick_device(args), args.sample_batch, UNetConfig.from_dict(config["model"]), config["timesteps"],
                     config["image_size"], kept, training=False,
                     guided=args.conditional and settings.guidance_scale not in (0, 1))
    num_classes = config.get("num_classes")
    if args.conditional and num_classes is None:
        raise UserError(f"--conditional was given but {args.model_path!r} is an unconditional model; "
                        "drop --conditional or use a checkpoint trained with --conditional")
    if args.guidance_sweep and num_classes is None:
        raise UserError(f"--guidance_sweep needs a conditional model; {args.model_path!r} is unconditional")
    if args.sample_classes:  # now with a conditional model (check_flag_combinations)
        args.sample_classes = class_indices(args.sample_classes, config["classes"])
    if num_classes is not None and not args.conditional:
        print("note: conditional checkpoint without --conditional: the bound of its unconditional model (null label); "
              "add --conditional for the bound given each image's class" if args.eval_nll else
              "note: conditional checkpoint sampled without --conditional: drawing unconditional samples "
              "(null label); add --conditional for class-guided samples", file=sys.stderr)


def inference_fid_reference(args, config, device):
    """--eval_fid's network (InceptionFeatures, fetched on first use) and Reference: --fid_ref_stats, else the
    statistics of the --fid_ref split at --data_dir (default: where the model was trained) of --dataset (default: the
    model's, there)."""
    features = InceptionFeatures(args.fid_inception, device, verbose=not args.quiet)
    grayscale_fid_note(config, not args.quiet)
    if args.fid_ref_stats:
        return features, ref_statistics_file(args.fid_ref_stats, trained_data(config))
    data_dir = args.data_dir or config["data_dir"]
    dataset = args.dataset or (config.get("dataset") if data_dir == config["data_dir"] else None)
    return features, fid_reference(features, config, None, data_dir, dataset, args.fid_ref, not args.quiet)


# ------------------------------------------------------------------------- foreign weights

def import_job(args):
    """--import_weights: a foreign file of Ho et al.'s network (fetched first when named) → <models_dir>/<run>/ckpt.pt
    and config.json, sampled as the paper did unless sampling flags say otherwise."""
    verbose = not args.quiet
    path = foreign_weights_path(args.import_weights, verbose)
    foreign = read_foreign(path)
    imported = import_weights(foreign)
    args.run_name = args.run_name or sanitized_run_name(
        args.import_weights if args.import_weights in PUBLISHED else
        os.path.splitext(os.path.basename(os.path.normpath(path)))[0], fallback="imported")
    files = run_files(args)
    target = files.checkpoint("ckpt.pt")
    if os.path.exists(target):
        raise UserError(f"{target} exists: give another --run_name (or remove that run first)")
    settings = sampler_settings(args, SamplerSettings("ddpm", variance=imported.variance), imported.timesteps)
    config = imported_config(args, imported, settings)
    os.makedirs(files.ckpt_dir, exist_ok=True)
    save_checkpoint(imported_checkpoint(config, imported.weights, foreign.source), target)
    write_config_json(config, files.checkpoint("config.json"))
    if verbose:
        count = sum(w.numel() for w in imported.weights.values())
        print(f"imported Ho et al.'s network ({count:,} parameters) from {foreign.source} "
              f"({FORMAT_NAMES[foreign.style]}) into {target}; it samples with "
              f"{settings.describe(guided=False)}. Sample it: python ddpm_main.py --inference --model_path {target}"
              f"{FAST_SAMPLING if settings.sampler == 'ddpm' else ''}",
              file=sys.stderr)


FAST_SAMPLING = " (add --sampler dpm++2m --sampling_steps 15 for 15 network evaluations an image instead of 1,000)"


def foreign_weights_path(source, verbose):
    """The file --import_weights names: a path as given, or a published file by name, fetched once (ddpm_download)."""
    if source in PUBLISHED:
        return fetched(PUBLISHED[source], progress=verbose and stderr_is_terminal(), verbose=verbose)
    if source == "ho2020-hub":
        raise UserError(f"{HUB_FOLDER} publishes no checksum to check a fetch by: download the folder by hand "
                        f"(huggingface-cli download {HUB_FOLDER} --local-dir ddpm-cifar10-32, or the files of "
                        f"https://huggingface.co/{HUB_FOLDER}) and pass it: --import_weights ddpm-cifar10-32")
    return source


CIFAR10_TRAINED = {"dataset": "cifar10", "classes": CIFAR10_CLASSES, "channels": 3, "data_size": [32, 32],
                   "num_train": 50_000, "num_val": 0, "num_test": 10_000}  # what Ho et al. trained on: all 50,000


def imported_config(args, imported, settings):
    """The config of an imported network: --preset ddpm_cifar10's recipe (what the paper trained it with) over the
    flags' defaults, the network and diffusion the file holds, CIFAR-10's data, and the sampling settings."""
    recipe = {key: value for key, value in PRESETS["ddpm_cifar10"][1].items() if key in COMMAND_LINE_SETTINGS}
    flags = {**{key: getattr(args, key) for key in COMMAND_LINE_SETTINGS}, **recipe,
             **{key: flag_value(getattr(imported.network, key)) for key in MODEL_SETTINGS},
             "timesteps": imported.timesteps, "schedule": imported.schedule, "prediction": imported.prediction,
             "conditional": False, "data_dir": args.data_dir or DEFAULT_DATA_DIR, "sampling": settings}
    return training_config(flags, CIFAR10_TRAINED)


def export_job(args):
    """--export_diffusers DIR: --model_path's network and EMA weights as a diffusers DDPMPipeline folder."""
    ckpt, _ = load_sampling_model(args.model_path)
    config = ckpt["config"]
    network = UNetConfig.from_dict(config["model"])
    problem = export_problem(config, network)
    if problem:
        raise UserError(f"--export_diffusers: {args.model_path!r} {problem}")
    write_folder(diffusers_folder_files(config, network, ckpt.get("ema") or ckpt["model"]), args.export_diffusers)
    if not args.quiet:
        print(f"wrote {args.export_diffusers}: {args.model_path}'s network as a diffusers DDPMPipeline (UNet2DModel "
              f"and DDPMScheduler); load it with diffusers.DDPMPipeline.from_pretrained({args.export_diffusers!r})",
              file=sys.stderr)


def flags_given(parser, args, argv):
    """The names (dests) of the flags given on the command line, as opposed to those left at their defaults: argv
    parsed again into a namespace whose every entry is already set, so that argparse fills in no default."""
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return frozenset(name for name, value in vars(given).items() if value is not unset)


def parse_command_line(parser, argv):
    """argv's flags, those a --preset names (ddpm_presets) filling in the ones not given: a new training run's."""
    args = parser.parse_args(argv)
    if args.preset is not None:
        if args.inference or args.resume is not None:
            parser.error("--preset sets up a new training run; a resumed run keeps its checkpoint's settings, and "
                         "inference samples with the checkpoint's")
        parser.set_defaults(**PRESETS[args.preset][1])
        args = parser.parse_args(argv)
    return args


def main(argv=None):
    started = time.perf_counter()  # the time budget's wall clock starts here
    parser = build_parser()
    args = parse_command_line(parser, argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.started = started
    args.given = flags_given(parser, args, args.argv)
    args.job = job_of(args)
    check_args(args, parser)
    args.rank, args.world_size, args.local_rank = init_distributed(torch.cuda.is_available() and not args.no_cuda) \
        if args.job == "train" else (0, 1, 0)
    try:
        with memory_guard("training" if args.job == "train" else args.job,
                          "lower --sample_batch, --batch_size or --dim"):
            JOBS[args.job](args)
    except STOPPING_ERRORS as e:
        if args.rank == 0:
            print(f"{parser.prog}: {failure_text(e)}", file=sys.stderr)
        sys.exit(exit_status(e))
    finally:
        if args.world_size > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


JOBS = {"train": train, "inference": inference, "import": import_job, "export": export_job}

if __name__ == "__main__":
    main()
