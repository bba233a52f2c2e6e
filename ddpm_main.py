"""Train a DDPM on CIFAR-10 (unconditional, or class-conditional with classifier-free guidance)
and sample from a saved checkpoint.

    python ddpm_main.py --epochs 30 --save_model --run_name DDPM_30epochs
    python ddpm_main.py --conditional --epochs 30 --p_uncond 0.1 --save_model --run_name DDPM_cond
    python ddpm_main.py --inference --model_path models/DDPM_30epochs/ckpt.pt --num_samples 64
"""
import argparse
import contextlib
import copy
import math
import os
import signal
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_diffusion import DEFAULT_GUIDANCE_SCALE, Diffusion, make_schedule
from ddpm_helpers import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CIFAR10_CLASSES, FID_STATS_NAME, Denoiser,
                          DeviceLoader, FIDFeatures, UserError, all_ranks_mean, barrier, max_over_ranks,
                          frechet_distance, init_distributed, reference_statistics, atomic_torch_save, environment_versions, load_checkpoint, load_dataset,
                          plot_loss_history, save_grid, save_individual_pngs, save_labelled_grid, stderr_is_terminal,
                          to_model_range, to_uint8, train_val_split, write_json)
from ddpm_model import UNet, UNetConfig

EVAL_SEED = 1234          # fixed t and noise for validation / test losses, comparable across epochs
GRID_SEED = 4321          # fixed noise for the per-epoch sample grid, so epochs can be compared
GRID_PER_CLASS = 8        # columns of the per-epoch grid of a conditional model (one row per class)
GRID_UNCONDITIONAL = 64   # images in the per-epoch grid of an unconditional model


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss diverged): reported as one line, exit status 1."""


class Interrupted(Exception):
    """SIGINT / SIGTERM during training: state saved, reported with how to resume; exit status 130."""


# --------------------------------------------------------------------------------------- CLI

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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5, help="passes over the 45,000 training images")
    g.add_argument("--batch_size", type=int, default=64, help="images per optimizer step")
    g.add_argument("--lr", type=float, default=0.003, help="AdamW learning rate (after warm-up)")
    g.add_argument("--warmup_steps", type=int, default=200, help="linear learning-rate warm-up, in steps")
    g.add_argument("--timesteps", type=int, default=100, help="T, the number of diffusion steps")
    g.add_argument("--schedule", choices=("linear", "cosine", "sigmoid"), default="cosine", help="noise schedule β_t")
    g.add_argument("--loss_type", choices=("l1", "l2", "huber"), default="l2", help="norm of ε − ε_θ (or v − v_θ)")
    g.add_argument("--prediction", choices=("eps", "v"), default="eps",
                   help="what the network predicts: the noise ε (Ho et al.) or v = √ᾱ ε − √(1−ᾱ) x_0")
    g.add_argument("--min_snr_gamma", type=float,
                   help="Min-SNR-γ loss weighting, e.g. 5 (default: uniform over t)")
    g.add_argument("--lr_decay", choices=("none", "cosine"), default="none",
                   help="after warm-up: constant lr, or cosine decay to 0 over --epochs (or --time_budget_min)")
    g.add_argument("--conditional", action="store_true", help="class-conditional model (classifier-free guidance)")
    g.add_argument("--p_uncond", type=float, default=0.1, help="probability a label is dropped to the null label")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the weights used for sampling; 0: off")
    g.add_argument("--dim", type=int, default=32, help="U-Net base channels")
    g.add_argument("--dim_mults", type=int_list, default=[1, 2, 4], help="U-Net channel multipliers per stage")
    g.add_argument("--data_dir", help="CIFAR-10 download folder, or a train/ test/ image-folder tree "
                   "(default ./data; at inference the folder the model was trained on)")
    g.add_argument("--checkpoint_every", type=int, default=1,
                   help="epochs between last.pt writes (the last epoch, interruptions and evaluations always)")
    g.add_argument("--eval_every", type=int, default=1,
                   help="epochs between validation/test losses, grids and plots (the last epoch always)")
    g.add_argument("--save_model", action="store_true", help="also write models/<run_name>/ckpt.pt at the end")
    g.add_argument("--models_dir", default="models", help="checkpoints go to <models_dir>/<run_name>/")
    g.add_argument("--log_interval", type=int, default=100, help="steps between loss read-outs (and NaN checks)")
    g.add_argument("--no_compile", action="store_true", help="do not torch.compile the model on CUDA")
    g.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a last.pt ('auto': <models_dir>/<run_name>/last.pt); --epochs sets the end")
    g.add_argument("--time_budget_min", type=float,
                   help="stop training after this many minutes of training steps, then finish cleanly")

    g = p.add_argument_group("inference")
    g.add_argument("--inference", action="store_true", help="sample from --model_path instead of training")
    g.add_argument("--model_path", help="checkpoint to sample from")
    g.add_argument("--num_samples", type=int, default=64, help="images to generate")
    g.add_argument("--sample_classes", help="comma list of class indices, cycled to --num_samples (default 0-9)")
    g.add_argument("--guidance_sweep", type=float_list, metavar="W,W,...",
                   help="write one grid: a row per guidance scale, a column per class, from the same noise")

    g = p.add_argument_group("sampling (inference and the per-epoch grids)")
    g.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                   help="classifier-free guidance w: 0 unconditional, 1 conditional, >1 stronger class")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="ancestral DDPM or DDIM")
    g.add_argument("--sampling_steps", type=int, help="DDIM steps (default: T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
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
    g.add_argument("--no_cuda", action="store_true", help="run on CPU even when CUDA is available")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def check_args(args, parser):
    """Reject bad values before anything is read or written (exit status 2)."""
    for name in ("epochs", "batch_size", "timesteps", "num_samples", "log_interval", "sample_batch", "dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        parser.error(f"--lr must be greater than 0, got {args.lr}")
    if not 0 <= args.p_uncond <= 1:
        parser.error(f"--p_uncond must be in [0, 1], got {args.p_uncond}")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.min_snr_gamma is not None and not args.min_snr_gamma > 0:
        parser.error(f"--min_snr_gamma must be greater than 0, got {args.min_snr_gamma}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup_steps must be 0 or more, got {args.warmup_steps}")
    if not 0 <= args.eta <= 1:
        parser.error(f"--eta must be in [0, 1], got {args.eta}")
    if any(m < 1 for m in args.dim_mults):
        parser.error(f"--dim_mults must be positive integers, got {args.dim_mults}")
    if args.sampling_steps is not None:
        if args.sampler != "ddim":
            parser.error("--sampling_steps applies to --sampler ddim (DDPM always runs all T steps)")
        if args.sampling_steps < 1 or (not args.inference and args.sampling_steps > args.timesteps):
            parser.error(f"--sampling_steps must be in 1..--timesteps ({args.timesteps}), got {args.sampling_steps}")
    if args.sample_classes is not None:
        args.sample_classes = parse_classes(args.sample_classes, len(CIFAR10_CLASSES), parser.error)
    for name in ("eval_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.eval_fid < 0:
        parser.error(f"--eval_fid must be 0 (off) or a sample count, got {args.eval_fid}")
    if args.eval_fid:
        if not args.fid_inception:
            parser.error("--eval_fid needs --fid_inception PATH: the TF-Inception TorchScript (see README, FID)")
        if not os.path.isfile(args.fid_inception):
            parser.error(f"--fid_inception {args.fid_inception!r} is not a file")
        if args.fid_ref_stats and not os.path.isfile(args.fid_ref_stats):
            parser.error(f"--fid_ref_stats {args.fid_ref_stats!r} is not a file")
    if args.time_budget_min is not None and not args.time_budget_min > 0:
        parser.error(f"--time_budget_min must be greater than 0, got {args.time_budget_min}")
    if args.guidance_sweep is not None:
        if not args.inference:
            parser.error("--guidance_sweep goes with --inference (it samples from a trained model)")
        if not args.guidance_sweep or min(args.guidance_sweep) < 0:
            parser.error("--guidance_sweep needs non-negative guidance scales, e.g. 0,1,3,5,7")
    if args.resume is not None and args.inference:
        parser.error("--resume continues training; for sampling use --inference --model_path")
    if args.inference and not args.model_path:
        parser.error("--inference needs --model_path (a checkpoint written by training with this tool)")


def parse_classes(text, num_classes, error):
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        error("--sample_classes is empty: give class indices such as 0,1,2")
    classes = []
    for item in items:
        try:
            classes.append(int(item))
        except ValueError:
            error(f"--sample_classes: {item!r} is not an integer class index")
        if not 0 <= classes[-1] < num_classes:
            error(f"--sample_classes: class {classes[-1]} is outside 0-{num_classes - 1}")
    return classes


# ----------------------------------------------------------------------------------- pieces

def pick_device(args):
    if torch.cuda.is_available() and not args.no_cuda:
        return torch.device("cuda", getattr(args, "local_rank", 0))
    return torch.device("cpu")


def build_diffusion(config, device):
    return Diffusion(config["timesteps"], lambda T: make_schedule(config["schedule"], T), config["image_size"],
                     device, prediction=config.get("prediction", "eps"), min_snr_gamma=config.get("min_snr_gamma"))


def learning_rate(args, step, progress):
    """--lr after a linear warm-up over --warmup_steps, then constant or cosine-decayed with progress ∈ [0, 1]."""
    warmup = min(1.0, (step + 1) / max(1, args.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) if args.lr_decay == "cosine" else 1.0
    return args.lr * warmup * decay


def class_cycle(classes, n, device):
    """The given class indices repeated to length n, as a LongTensor (n,)."""
    return torch.tensor(classes, dtype=torch.long).repeat(math.ceil(n / len(classes)))[:n].to(device)


@torch.no_grad()
def generate(diffusion, denoiser, config, num_images, class_labels, args, batch_size, progress):
    """num_images samples in batches of batch_size; class_labels (num_images,) or None."""
    chunks = []
    size, channels = config["image_size"], config["model"]["channels"]
    for start in tqdm(range(0, num_images, batch_size), desc="sampling batches", disable=not progress,
                      leave=False):
        n = min(batch_size, num_images - start)
        labels = None if class_labels is None else class_labels[start:start + n]
        chunks.append(diffusion.sample(denoiser, size, n, channels, labels, args.guidance_scale,
                                       args.sampler, args.sampling_steps, args.eta, progress=progress).cpu())
    return torch.cat(chunks)


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


def train_step(x, y, step, lr, model, ema_model, optimizer, diffusion, denoiser, args, rank=0, world_size=1):
    """One optimizer step on images x (B, 3, H, W) with labels y (B,); returns the loss as a device
    tensor, so the caller decides when to synchronise with the host.

    t, the label drops and ε are drawn for the global batch (world_size · B) and sliced to this rank's
    images: any number of ranks trains on the randomness of one process with the global batch."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n, mine = len(x) * world_size, slice(rank, None, world_size)
    t = torch.randint(0, diffusion.timesteps, (n,), device=x.device)[mine]
    labels = None
    if denoiser.num_classes is not None:  # classifier-free guidance: drop labels to the null label
        labels = torch.where(torch.rand(n, device=x.device)[mine] < args.p_uncond,
                             torch.full_like(y, denoiser.num_classes), y)
    noise = torch.randn((n, *x.shape[1:]), device=x.device)[mine]
    loss = diffusion.p_losses(denoiser, x, t, noise, loss_type=args.loss_type, class_labels=labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    update_ema(ema_model, model, min(args.ema_decay, (1 + step) / (10 + step)))
    return loss.detach()


@contextlib.contextmanager
def seeded_rng(seed, device):
    """Draw from `seed` inside the block, leaving the caller's RNG state (training's) untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """θ_ema ← decay · θ_ema + (1 − decay) · θ."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)


def make_grid_images(diffusion, denoiser, config, args, device):
    """The per-epoch grid from fixed noise: one row per class (conditional) or 8 × 8."""
    with seeded_rng(GRID_SEED, device):
        if config["conditional"]:
            labels = torch.arange(config["num_classes"], device=device).repeat_interleave(GRID_PER_CLASS)
            images = generate(diffusion, denoiser, config, len(labels), labels, args, args.sample_batch, False)
            return images, GRID_PER_CLASS
        images = generate(diffusion, denoiser, config, GRID_UNCONDITIONAL, None, args, args.sample_batch, False)
        return images, 8


def sampler_description(args):
    steps = args.sampling_steps or "T"
    return f"{args.sampler}" + (f", {steps} steps, eta {args.eta}" if args.sampler == "ddim" else "") + \
        f", guidance {args.guidance_scale}"


def measure_fid(diffusion, denoiser, config, args, device, train_images_uint8, verbose):
    """FID of args.eval_fid new samples (class-balanced when conditional) against the training images'
    Inception statistics (cached beside the data, or --fid_ref_stats). Also saves the samples'
    uint8 array as fid_samples_<run>.npz, so any other FID tool can read the very same images.
    train_images_uint8 (N, 3, H, W) may be None: they are then read from args.data_dir."""
    n = args.eval_fid
    if n < 10000:
        print(f"warning: FID from {n} < 10,000 samples reads high; use 10,000 or more to compare with published "
              "figures", file=sys.stderr)
    features = FIDFeatures(args.fid_inception, device)
    if args.fid_ref_stats:
        ref = np.load(args.fid_ref_stats)
        mu_ref, sigma_ref = ref["mu"], ref["sigma"].astype(np.float64)
    else:
        if train_images_uint8 is None:
            train_images_uint8 = load_dataset(args.data_dir)["train_images"]
        cache = os.path.join(args.data_dir, FID_STATS_NAME) if os.path.isdir(args.data_dir) else None
        mu_ref, sigma_ref = reference_statistics(features, train_images_uint8.permute(0, 2, 3, 1).numpy(), cache,
                                                 progress=verbose and stderr_is_terminal())
    labels = None
    if config["conditional"]:
        labels = torch.arange(n, device=device) % config["num_classes"]
    with seeded_rng(args.seed, device):
        images = to_uint8(generate(diffusion, denoiser, config, n, labels, args, args.sample_batch,
                                   verbose and stderr_is_terminal()))
    np.savez(os.path.join(args.save_dir, f"fid_samples_{args.run_name}.npz"), images=images)
    fid = frechet_distance(*features.statistics(images), mu_ref, sigma_ref)
    if verbose:
        print(f"FID {fid:.3f} (n={n}, {sampler_description(args)})", flush=True)
    return fid


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


# ----------------------------------------------------------------------------------- train

# settings a resumed run takes from its checkpoint, whatever the command line says
RESUMED_SETTINGS = ("conditional", "timesteps", "schedule", "loss_type", "prediction", "min_snr_gamma", "dim",
                    "dim_mults", "lr", "lr_decay", "warmup_steps", "batch_size", "p_uncond", "ema_decay", "seed")


def resume_checkpoint(args):
    """The checkpoint named by --resume ('auto': this run's last.pt), with its settings copied into args."""
    path = args.resume
    if path == "auto":
        path = os.path.join(args.models_dir, args.run_name, "last.pt")
        if not os.path.isfile(path):
            raise UserError(f"--resume auto: there is no {path} to resume (was --run_name {args.run_name!r} "
                            f"trained with --models_dir {args.models_dir!r}?)")
    elif not os.path.isfile(path):
        raise UserError(f"--resume {path!r} does not exist")
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt:
        raise UserError(f"--resume {path!r} holds weights only (no optimizer state); resume from last.pt")
    for key in RESUMED_SETTINGS:
        setattr(args, key, ckpt["config"].get(key, getattr(args, key)))
    args.data_dir = args.data_dir or ckpt["config"]["data_dir"]
    return ckpt


def train(args):
    args.run_name = args.run_name or "DDPM"
    ckpt = resume_checkpoint(args) if args.resume else None
    args.data_dir = args.data_dir or "./data"
    device = pick_device(args)
    use_cuda = device.type == "cuda"
    rank, world_size = args.rank, args.world_size
    is_main = rank == 0  # only rank 0 writes files and prints
    torch.manual_seed(args.seed)
    ckpt_dir = os.path.join(args.models_dir, args.run_name)
    verbose = not args.quiet and is_main
    bars = verbose and stderr_is_terminal()
    timing = {"decode_s": 0.0, "compile_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "sample_s": 0.0}

    # data: whole splits as uint8 tensors on the device
    t0 = time.perf_counter()
    data = load_dataset(args.data_dir)
    train_idx, val_idx = train_val_split(len(data["train_images"]))
    timing["decode_s"] = time.perf_counter() - t0
    if is_main:
        os.makedirs(args.save_dir, exist_ok=True)
        os.makedirs(ckpt_dir, exist_ok=True)
    classes = list(data["classes"])
    image_size = data["train_images"].shape[-1]
    train_loader = DeviceLoader(data["train_images"][train_idx], data["train_labels"][train_idx],
                                args.batch_size, device, shuffle=True, flip=True, seed=args.seed, rank=rank,
                                world_size=world_size)
    eval_loaders = {split: DeviceLoader(images, labels, args.batch_size, device, shuffle=False, flip=False,
                                        rank=rank, world_size=world_size)
                    for split, images, labels in (
                        ("val", data["train_images"][val_idx], data["train_labels"][val_idx]),
                        ("test", data["test_images"], data["test_labels"]))}

    # model, EMA, optimizer, diffusion
    model_config = UNetConfig(dim=args.dim, dim_mults=tuple(args.dim_mults), channels=3,
                              num_classes=len(classes) if args.conditional else None)
    config = {
        "model": model_config.to_dict(), "conditional": args.conditional,
        "num_classes": model_config.num_classes, "classes": classes, "image_size": image_size,
        "timesteps": args.timesteps, "schedule": args.schedule, "loss_type": args.loss_type,
        "prediction": args.prediction, "min_snr_gamma": args.min_snr_gamma, "lr_decay": args.lr_decay,
        "dim": args.dim, "dim_mults": list(args.dim_mults), "lr": args.lr, "warmup_steps": args.warmup_steps,
        "batch_size": args.batch_size, "epochs": args.epochs, "p_uncond": args.p_uncond,
        "ema_decay": args.ema_decay, "seed": args.seed, "run_name": args.run_name,
        "data_dir": args.data_dir, "num_train": len(train_idx), "num_val": len(val_idx),
        "num_test": len(data["test_images"]), "time_budget_min": args.time_budget_min,
        "world_size": world_size, "global_batch_size": args.batch_size * world_size,
    }
    model = UNet(model_config).to(device, memory_format=torch.channels_last)  # faster convolutions on GPU and CPU
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=use_cuda)
    diffusion = build_diffusion(config, device)
    compile_model = use_cuda and not args.no_compile
    trained_model = model  # what the training forward runs through: DDP averages gradients over ranks
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        trained_model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    train_denoiser = Denoiser(trained_model, compile=compile_model, amp=use_cuda)
    ema_denoiser = Denoiser(ema_model, compile=compile_model, amp=use_cuda)
    num_params = sum(p.numel() for p in model.parameters())

    # training state: fresh, or everything a checkpoint holds
    history = {"train_loss": [], "val_loss": [], "test_loss": [], "epochs": []}
    state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "epoch_loss_sum": 0.0, "best_val": math.inf}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history = ckpt["history"]
        state = {k: ckpt[k] for k in state}
        timing = {k: ckpt["timing"].get(k, 0.0) for k in timing}
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if use_cuda and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    history_path = os.path.join(args.save_dir, f"loss_history_{args.run_name}.json")
    if is_main:
        write_json({**config, "versions": environment_versions()}, os.path.join(ckpt_dir, "config.json"))
    if ckpt is None and is_main:
        save_forward_strip(diffusion, data["train_images"][train_idx[:1]],
                           os.path.join(args.save_dir, f"forward_process_{args.run_name}.png"))
    if verbose:
        what = (f"resuming '{args.run_name}' from {args.resume} at epoch {state['epoch'] + 1}, "
                f"batch {state['batch_in_epoch']}" if ckpt else f"training '{args.run_name}'")
        print(f"{what}: {'conditional' if args.conditional else 'unconditional'} DDPM on {device}, "
              f"{num_params / 1e6:.2f}M parameters, {len(train_idx)} train / {len(val_idx)} val / "
              f"{len(data['test_images'])} test images, T={args.timesteps} ({args.schedule})"
              + (f"; {world_size} ranks × batch {args.batch_size}" if world_size > 1 else ""), flush=True)

    def checkpoint():
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if use_cuda else []}
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
                "versions": environment_versions(), "model": model.state_dict(), "ema": ema_model.state_dict(),
                "optimizer": optimizer.state_dict(), "history": history, "timing": timing, "rng": rng, **state}

    def time_spent(running_epoch_s=0.0):
        """The fraction of --time_budget_min that training steps (compilation excluded) have used."""
        return (timing["train_s"] + running_epoch_s) / (args.time_budget_min * 60) if args.time_budget_min else 0.0

    def out_of_time(running_epoch_s=0.0):
        return time_spent(running_epoch_s) >= 1

    time_progress = time_spent()
    signals = SignalFlag()
    compiled_batch_sizes = set()
    with signals:
        epoch_bar = tqdm(range(state["epoch"] + 1, args.epochs + 1), desc="epochs", disable=not bars,
                         initial=state["epoch"], total=args.epochs)
        for epoch in epoch_bar:
            # --- one epoch of training steps; losses stay on the device until a read-out
            model.train()
            start_batch = state["batch_in_epoch"]
            loss_sum = torch.tensor(state["epoch_loss_sum"], device=device)
            batch_bar = tqdm(train_loader.batches(epoch, start_batch), total=len(train_loader), initial=start_batch,
                             desc=f"epoch {epoch}", leave=False, disable=not bars)
            epoch_start = interval_start = time.perf_counter()
            untimed, interval_images, epoch_images = 0.0, 0, 0
            for x, y in batch_bar:
                new_shape = compile_model and len(x) not in compiled_batch_sizes  # compile traces each new size
                if new_shape:
                    torch.cuda.synchronize()
                step_start = time.perf_counter()
                # how far along, for the lr decay: by training time under a budget (agreed between ranks at
                # read-outs, so every rank uses the same lr), else by steps
                progress = time_progress if args.time_budget_min else state["step"] / (args.epochs * len(train_loader))
                loss = train_step(x, y, state["step"], learning_rate(args, state["step"], progress), model, ema_model,
                                  optimizer, diffusion, train_denoiser, args, rank, world_size)
                loss_sum += loss
                state["step"] += 1
                state["batch_in_epoch"] += 1
                interval_images += len(x)
                epoch_images += len(x)
                if new_shape:  # a step that compiles is timed apart from training
                    torch.cuda.synchronize()
                    untimed += time.perf_counter() - step_start
                    timing["compile_s"] += time.perf_counter() - step_start
                    compiled_batch_sizes.add(len(x))
                read_out = state["step"] % args.log_interval == 0
                if read_out:  # the only host syncs inside an epoch
                    running = (all_ranks_mean(loss_sum, world_size) / state["batch_in_epoch"]).item()
                    check_finite(running, epoch, state["step"], ckpt_dir)
                    now = time.perf_counter()
                    batch_bar.set_postfix(loss=f"{running:.4f}",
                                          img_s=f"{interval_images * world_size / (now - interval_start):.0f}")
                    interval_start, interval_images = now, 0
                if read_out or world_size == 1:  # ranks decide together, at read-outs
                    running_s = time.perf_counter() - epoch_start - untimed
                    signalled, spent, time_progress = max_over_ranks(
                        [signals.received is not None, out_of_time(running_s), time_spent(running_s)], world_size)
                    if signalled or spent:
                        break
            # waits for the device: the epoch's steps are done
            state["epoch_loss_sum"] = all_ranks_mean(loss_sum, world_size).item()
            epoch_train_s = time.perf_counter() - epoch_start - untimed
            timing["train_s"] += epoch_train_s
            check_finite(state["epoch_loss_sum"], epoch, state["step"], ckpt_dir)
            interrupted, budget_spent = (bool(v) for v in max_over_ranks([signals.received is not None, out_of_time()],
                                                                         world_size))
            signal_name = signals.received or "a signal (on another rank)"
            if interrupted:
                if is_main:
                    atomic_torch_save(checkpoint(), os.path.join(ckpt_dir, "last.pt"))
                barrier(world_size)
                raise Interrupted(f"{signal_name} received: stopped after step {state['step']} (epoch {epoch}, "
                                  f"batch {state['batch_in_epoch']}); saved {ckpt_dir}/last.pt. Resume with:\n"
                                  f"  {resume_command()}")
            train_loss = state["epoch_loss_sum"] / max(1, state["batch_in_epoch"])

            # --- end of epoch: EMA evaluation, JSON, plots and grid (every --eval_every epochs), checkpoints
            evaluate = epoch == args.epochs or epoch % args.eval_every == 0 or budget_spent
            is_best = False
            if evaluate:
                t0 = time.perf_counter()
                ema_model.eval()
                val_loss = evaluate_loss(diffusion, ema_denoiser, eval_loaders["val"], args.conditional,
                                         args.loss_type)
                test_loss = evaluate_loss(diffusion, ema_denoiser, eval_loaders["test"], args.conditional,
                                          args.loss_type)
                timing["eval_s"] += time.perf_counter() - t0
                for key, value in (("train_loss", train_loss), ("val_loss", val_loss), ("test_loss", test_loss),
                                   ("epochs", epoch)):
                    history[key].append(value)
                if is_main:
                    write_json(history, history_path)
                    plot_loss_history(history, os.path.join(args.save_dir, f"loss_curves_{args.run_name}.png"),
                                      args.run_name)
                    t0 = time.perf_counter()
                    images, nrow = make_grid_images(diffusion, ema_denoiser, config, args, device)
                    save_grid(images, os.path.join(args.save_dir, f"samples_{args.run_name}_epoch{epoch:03d}.png"),
                              nrow)
                    timing["sample_s"] += time.perf_counter() - t0
                is_best = val_loss < state["best_val"]
                state["best_val"] = min(state["best_val"], val_loss)
            state.update(epoch=epoch, batch_in_epoch=0, epoch_loss_sum=0.0)
            if is_main and (evaluate or epoch % args.checkpoint_every == 0):
                last = checkpoint()
                atomic_torch_save(last, os.path.join(ckpt_dir, "last.pt"))
                if is_best:
                    atomic_torch_save({k: v for k, v in last.items() if k != "optimizer"},
                                      os.path.join(ckpt_dir, "best.pt"))
            if evaluate:
                epoch_bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
            if verbose and not bars:  # a line per epoch where there are no bars (logs, pipes)
                losses = f"  val {val_loss:.4f}  test {test_loss:.4f}" if evaluate else ""
                images_per_s = epoch_images * world_size / max(epoch_train_s, 1e-9)
                print(f"epoch {epoch}/{args.epochs}  train {train_loss:.4f}{losses}  ({images_per_s:.0f} img/s)",
                      flush=True)
            if interrupted:
                barrier(world_size)
                raise Interrupted(f"{signal_name} received: stopped after epoch {epoch}; saved "
                                  f"{ckpt_dir}/last.pt. Resume with:\n  {resume_command()}")
            if budget_spent:
                if verbose:
                    print(f"time budget of {args.time_budget_min} min spent after epoch {epoch} "
                          f"(step {state['step']}): finishing", flush=True)
                break

    if not is_main:
        barrier(world_size)  # rank 0 writes the outputs below
        return
    if args.save_model:
        atomic_torch_save(checkpoint(), os.path.join(ckpt_dir, "ckpt.pt"))
    metrics = {"world_size": world_size, "run_name": args.run_name, "device": str(device), "num_params": num_params, "steps": state["step"],
               "epochs_done": state["epoch"], "batch_size": args.batch_size,
               "stopped_by_time_budget": out_of_time(),
               "train_images_per_s": (state["step"] * args.batch_size * world_size / timing["train_s"]
                                      if timing["train_s"] else None),
               "timing": timing, "final": {k: v[-1] for k, v in history.items() if v}}
    if args.eval_fid:
        t0 = time.perf_counter()
        metrics["fid"] = measure_fid(diffusion, ema_denoiser, config, args, device, data["train_images"], verbose)
        metrics.update(fid_samples=args.eval_fid, fid_sampler=sampler_description(args))
        timing["fid_s"] = time.perf_counter() - t0
    write_json(metrics, os.path.join(args.save_dir, f"metrics_{args.run_name}.json"))
    if verbose:
        print(f"done: loss history {history_path}, checkpoints in {ckpt_dir}", flush=True)
    barrier(world_size)


def resume_command():
    """This process's command line with --resume auto in place of any --resume."""
    argv, kept = sys.argv[1:], []
    skip = False
    for arg in argv:
        if skip or arg.startswith("--resume="):
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        kept.append(arg)
    return " ".join(["python", sys.argv[0], *kept, "--resume", "auto"])


def check_finite(loss, epoch, step, ckpt_dir):
    if not math.isfinite(loss):
        raise TrainingError(f"the training loss became {loss} at epoch {epoch}, step {step}; stopped. The last good "
                            f"checkpoint in {ckpt_dir} is untouched. Try a lower --lr or a larger --warmup_steps.")


def save_forward_strip(diffusion, image_uint8, path, count=10):
    """One training image noised at `count` evenly spaced t, left (t = 0) to right (t = T−1)."""
    x0 = to_model_range(image_uint8.to(diffusion.betas.device)).expand(count, -1, -1, -1)
    t = torch.linspace(0, diffusion.timesteps - 1, count).round().long().to(x0.device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(GRID_SEED)).to(x0.device)
    save_grid(diffusion.q_sample(x0, t, noise), path, nrow=count)


# ------------------------------------------------------------------------------- inference

@torch.no_grad()
def guidance_sweep_images(diffusion, denoiser, config, args, classes, device):
    """A row per guidance scale, a column per class; every row starts from the same noise and draws the
    same per-step noise, so only w changes between rows. Returns (rows · columns, C, H, W)."""
    labels = torch.tensor(classes, device=device)
    rows = []
    for w in args.guidance_sweep:
        with seeded_rng(args.seed, device):
            rows.append(diffusion.sample(denoiser, config["image_size"], len(classes), config["model"]["channels"],
                                         labels, w, args.sampler, args.sampling_steps, args.eta).cpu())
    return torch.cat(rows)


def inference(args):
    device = pick_device(args)
    ckpt = load_checkpoint(args.model_path)
    config = ckpt["config"]
    args.run_name = args.run_name or config.get("run_name") or "DDPM"
    num_classes = config.get("num_classes")
    if args.conditional and num_classes is None:
        raise UserError(f"--conditional was given but {args.model_path!r} is an unconditional model; "
                        "drop --conditional or use a checkpoint trained with --conditional")
    if args.sample_classes is not None and num_classes is not None and max(args.sample_classes) >= num_classes:
        raise UserError(f"--sample_classes: the model knows classes 0-{num_classes - 1}")
    if args.sampling_steps is not None and args.sampling_steps > config["timesteps"]:
        raise UserError(f"--sampling_steps {args.sampling_steps} is more than the model's T = {config['timesteps']}")
    if num_classes is not None and not args.conditional:
        print("note: conditional checkpoint sampled without --conditional: drawing unconditional samples "
              "(null label); add --conditional for class-guided samples", file=sys.stderr)
    model = UNet(UNetConfig.from_dict(config["model"]))
    model.load_state_dict(ckpt.get("ema") or ckpt["model"])
    model = model.to(device, memory_format=torch.channels_last).eval()
    use_cuda = device.type == "cuda"
    denoiser = Denoiser(model, compile=use_cuda and not args.no_compile, amp=use_cuda)
    diffusion = build_diffusion(config, device)
    torch.manual_seed(args.seed)
    if args.guidance_sweep:
        if num_classes is None:
            raise UserError(f"--guidance_sweep needs a conditional model; {args.model_path!r} is unconditional")
        path = os.path.join(args.save_dir, f"guidance_sweep_{args.run_name}.png")
        classes = args.sample_classes or list(range(num_classes))
        images = guidance_sweep_images(diffusion, denoiser, config, args, classes, device)
        os.makedirs(args.save_dir, exist_ok=True)
        save_labelled_grid(images, path, [f"w = {w:g}" for w in args.guidance_sweep],
                           [config["classes"][c] for c in classes])
        if not args.quiet:
            print(f"guidance sweep ({len(args.guidance_sweep)} scales × {len(classes)} classes): {path}", flush=True)
        return

    labels = None
    if args.conditional:
        labels = class_cycle(args.sample_classes or list(range(num_classes)), args.num_samples, device)
    progress = not args.quiet and stderr_is_terminal()
    t0 = time.perf_counter()
    images = generate(diffusion, denoiser, config, args.num_samples, labels, args, args.sample_batch, progress)
    seconds = time.perf_counter() - t0

    os.makedirs(args.save_dir, exist_ok=True)
    name = f"samples_{args.run_name}"
    if labels is not None:
        nrow = min(len(args.sample_classes or range(num_classes)), args.num_samples)
    else:
        nrow = math.ceil(math.sqrt(args.num_samples))
    grid_path = os.path.join(args.save_dir, f"{name}.png")
    save_grid(images, grid_path, nrow)
    save_individual_pngs(images, os.path.join(args.save_dir, name), labels, config.get("classes"))
    np.savez(os.path.join(args.save_dir, f"{name}.npz"), images=to_uint8(images))
    if not args.quiet:
        print(f"{args.num_samples} samples in {seconds:.1f} s on {device}: grid {grid_path}, "
              f"PNGs in {os.path.join(args.save_dir, name)}/", flush=True)
    if args.eval_fid:
        args.data_dir = args.data_dir or config["data_dir"]
        t0 = time.perf_counter()
        fid = measure_fid(diffusion, denoiser, config, args, device, None, not args.quiet)
        write_json({"run_name": args.run_name, "model_path": args.model_path, "fid": fid, "fid_samples": args.eval_fid,
                    "fid_sampler": sampler_description(args), "conditional": args.conditional and num_classes is not None,
                    "fid_s": time.perf_counter() - t0, "device": str(device)},
                   os.path.join(args.save_dir, f"metrics_{args.run_name}.json"))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    args.rank, args.world_size, args.local_rank = (0, 1, 0) if args.inference else \
        init_distributed(torch.cuda.is_available() and not args.no_cuda)
    try:
        inference(args) if args.inference else train(args)
    except (UserError, TrainingError, Interrupted) as e:
        if args.rank == 0:
            print(f"{parser.prog}: {'' if isinstance(e, Interrupted) else 'error: '}{e}", file=sys.stderr)
        sys.exit({UserError: 2, TrainingError: 1, Interrupted: 130}[type(e)])
    finally:
        if args.world_size > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
