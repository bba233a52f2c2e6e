"""Train a DDPM on CIFAR-10 (unconditional, or class-conditional with classifier-free guidance)
and sample from a saved checkpoint.

    python ddpm_main.py --epochs 30 --save_model --run_name DDPM_30epochs
    python ddpm_main.py --conditional --epochs 30 --p_uncond 0.1 --save_model --run_name DDPM_cond
    python ddpm_main.py --inference --model_path models/DDPM_30epochs/ckpt.pt --num_samples 64
"""
import argparse
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
from ddpm_helpers import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CIFAR10_CLASSES, Denoiser, DeviceLoader,
                          UserError, atomic_torch_save, environment_versions, load_checkpoint, load_dataset,
                          plot_loss_history, save_grid, save_individual_pngs, stderr_is_terminal,
                          to_uint8, train_val_split, write_json)
from ddpm_model import UNet, UNetConfig

EVAL_SEED = 1234          # fixed t and noise for validation / test losses, comparable across epochs
GRID_SEED = 4321          # fixed noise for the per-epoch sample grid, so epochs can be compared
GRID_PER_CLASS = 8        # columns of the per-epoch grid of a conditional model (one row per class)
GRID_UNCONDITIONAL = 64   # images in the per-epoch grid of an unconditional model


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss diverged): reported as one line, exit status 1."""


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
    g.add_argument("--loss_type", choices=("l1", "l2", "huber"), default="l2", help="norm of ε − ε_θ")
    g.add_argument("--conditional", action="store_true", help="class-conditional model (classifier-free guidance)")
    g.add_argument("--p_uncond", type=float, default=0.1, help="probability a label is dropped to the null label")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the weights used for sampling; 0: off")
    g.add_argument("--dim", type=int, default=32, help="U-Net base channels")
    g.add_argument("--dim_mults", type=int_list, default=[1, 2, 4], help="U-Net channel multipliers per stage")
    g.add_argument("--data_dir", default="./data", help="CIFAR-10 download folder, or a train/ test/ image-folder tree")
    g.add_argument("--save_model", action="store_true", help="also write models/<run_name>/ckpt.pt at the end")
    g.add_argument("--models_dir", default="models", help="checkpoints go to <models_dir>/<run_name>/")
    g.add_argument("--log_interval", type=int, default=100, help="steps between loss read-outs (and NaN checks)")
    g.add_argument("--no_compile", action="store_true", help="do not torch.compile the model on CUDA")

    g = p.add_argument_group("inference")
    g.add_argument("--inference", action="store_true", help="sample from --model_path instead of training")
    g.add_argument("--model_path", help="checkpoint to sample from")
    g.add_argument("--num_samples", type=int, default=64, help="images to generate")
    g.add_argument("--sample_classes", help="comma list of class indices, cycled to --num_samples (default 0-9)")

    g = p.add_argument_group("sampling (inference and the per-epoch grids)")
    g.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                   help="classifier-free guidance w: 0 unconditional, 1 conditional, >1 stronger class")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="ancestral DDPM or DDIM")
    g.add_argument("--sampling_steps", type=int, help="DDIM steps (default: T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
    g.add_argument("--sample_batch", type=int, default=500, help="images generated per forward batch")

    g = p.add_argument_group("general")
    g.add_argument("--run_name", default="DDPM", help="names the checkpoint folder and output files")
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
    if args.inference and not args.model_path:
        parser.error("--inference needs --model_path (a checkpoint written by training with this tool)")


def parse_classes(text, num_classes, error):
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        error(f"--sample_classes is empty: give class indices such as 0,1,2")
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
    return torch.device("cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu")


def build_diffusion(config, device):
    return Diffusion(config["timesteps"], lambda T: make_schedule(config["schedule"], T),
                     config["image_size"], device)


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
    """Mean loss over a split with t and ε drawn from a fixed seed: comparable between epochs."""
    g = torch.Generator().manual_seed(EVAL_SEED)
    total, count = torch.zeros((), device=loader.device), 0
    for x, y in loader.batches():
        t = torch.randint(0, diffusion.timesteps, (len(x),), generator=g).to(x.device)
        noise = torch.randn(x.shape, generator=g).to(x.device)
        loss = diffusion.p_losses(denoiser, x, t, noise, loss_type, y if conditional else None)
        total += loss * len(x)
        count += len(x)
    return (total / count).item()


def update_ema(ema_model, model, decay):
    """θ_ema ← decay · θ_ema + (1 − decay) · θ."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)


def make_grid_images(diffusion, denoiser, config, args, device):
    """The per-epoch grid from fixed noise: one row per class (conditional) or 8 × 8."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(GRID_SEED)
        if config["conditional"]:
            labels = torch.arange(config["num_classes"], device=device).repeat_interleave(GRID_PER_CLASS)
            images = generate(diffusion, denoiser, config, len(labels), labels, args, args.sample_batch, False)
            return images, GRID_PER_CLASS
        images = generate(diffusion, denoiser, config, GRID_UNCONDITIONAL, None, args, args.sample_batch, False)
        return images, 8


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

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------- train

def train(args):
    device = pick_device(args)
    use_cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    ckpt_dir = os.path.join(args.models_dir, args.run_name)
    verbose = not args.quiet
    bars = verbose and stderr_is_terminal()
    timing = {"decode_s": 0.0, "compile_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "sample_s": 0.0}

    # data: whole splits as uint8 tensors on the device
    t0 = time.perf_counter()
    data = load_dataset(args.data_dir)
    train_idx, val_idx = train_val_split(len(data["train_images"]))
    timing["decode_s"] = time.perf_counter() - t0
    os.makedirs(args.save_dir, exist_ok=True)
    os.makedirs(ckpt_dir, exist_ok=True)
    classes = list(data["classes"])
    image_size = data["train_images"].shape[-1]
    train_loader = DeviceLoader(data["train_images"][train_idx], data["train_labels"][train_idx],
                                args.batch_size, device, shuffle=True, flip=True, seed=args.seed)
    eval_loaders = {split: DeviceLoader(images, labels, args.batch_size, device, shuffle=False, flip=False)
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
        "dim": args.dim, "dim_mults": list(args.dim_mults), "lr": args.lr, "warmup_steps": args.warmup_steps,
        "batch_size": args.batch_size, "epochs": args.epochs, "p_uncond": args.p_uncond,
        "ema_decay": args.ema_decay, "seed": args.seed, "run_name": args.run_name,
        "data_dir": args.data_dir, "num_train": len(train_idx), "num_val": len(val_idx),
        "num_test": len(data["test_images"]),
    }
    model = UNet(model_config).to(device)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=use_cuda)
    diffusion = build_diffusion(config, device)
    compile_model = use_cuda and not args.no_compile
    train_denoiser = Denoiser(model, compile=compile_model, amp=use_cuda)
    ema_denoiser = Denoiser(ema_model, compile=compile_model, amp=use_cuda)
    num_params = sum(p.numel() for p in model.parameters())

    history = {"train_loss": [], "val_loss": [], "test_loss": [], "epochs": []}
    best_val = math.inf
    step = 0
    history_path = os.path.join(args.save_dir, f"loss_history_{args.run_name}.json")
    if verbose:
        print(f"training {'conditional' if args.conditional else 'unconditional'} DDPM '{args.run_name}' on "
              f"{device}: {num_params / 1e6:.2f}M parameters, {len(train_idx)} train / {len(val_idx)} val / "
              f"{len(data['test_images'])} test images, T={args.timesteps} ({args.schedule})", flush=True)

    def checkpoint(epoch):
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
            "versions": environment_versions(), "model": model.state_dict(), "ema": ema_model.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "history": history,
            "best_val": best_val,
        }

    epoch_bar = tqdm(range(1, args.epochs + 1), desc="epochs", disable=not bars)
    for epoch in epoch_bar:
        model.train()
        loss_sum = torch.zeros((), device=device)
        num_batches = 0
        batch_bar = tqdm(train_loader.batches(epoch), total=len(train_loader), desc=f"epoch {epoch}",
                         leave=False, disable=not bars)
        interval_start, interval_images = time.perf_counter(), 0
        for x, y in batch_bar:
            step_start = time.perf_counter()
            for group in optimizer.param_groups:  # linear warm-up, then constant
                group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
            t = torch.randint(0, args.timesteps, (len(x),), device=device)
            labels = None
            if args.conditional:  # classifier-free guidance: drop labels to the null label with p_uncond
                labels = torch.where(torch.rand(len(y), device=device) < args.p_uncond,
                                     torch.full_like(y, model_config.num_classes), y)
            loss = diffusion.p_losses(train_denoiser, x, t, loss_type=args.loss_type, class_labels=labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            update_ema(ema_model, model, min(args.ema_decay, (1 + step) / (10 + step)))
            loss_sum += loss.detach()
            num_batches += 1
            step += 1
            interval_images += len(x)
            if step == 1:  # the first step compiles: counted apart from training time
                if use_cuda:
                    torch.cuda.synchronize()
                timing["compile_s"] = time.perf_counter() - step_start
            else:
                timing["train_s"] += time.perf_counter() - step_start
            if step % args.log_interval == 0:
                running = (loss_sum / num_batches).item()  # the only host sync inside an epoch
                if not math.isfinite(running):
                    raise TrainingError(f"the training loss became {running} at epoch {epoch}, step {step}; "
                                        f"stopped. The last good checkpoint in {ckpt_dir} is untouched. "
                                        "Try a lower --lr or a larger --warmup_steps.")
                now = time.perf_counter()
                batch_bar.set_postfix(loss=f"{running:.4f}", img_s=f"{interval_images / (now - interval_start):.0f}")
                interval_start, interval_images = now, 0

        train_loss = (loss_sum / max(1, num_batches)).item()
        if not math.isfinite(train_loss):
            raise TrainingError(f"the training loss became {train_loss} in epoch {epoch}; stopped. The last "
                                f"good checkpoint in {ckpt_dir} is untouched. Try a lower --lr.")
        t0 = time.perf_counter()
        ema_model.eval()
        val_loss = evaluate_loss(diffusion, ema_denoiser, eval_loaders["val"], args.conditional, args.loss_type)
        test_loss = evaluate_loss(diffusion, ema_denoiser, eval_loaders["test"], args.conditional, args.loss_type)
        timing["eval_s"] += time.perf_counter() - t0
        for key, value in (("train_loss", train_loss), ("val_loss", val_loss), ("test_loss", test_loss),
                           ("epochs", epoch)):
            history[key].append(value)

        write_json(history, history_path)
        plot_loss_history(history, os.path.join(args.save_dir, f"loss_curves_{args.run_name}.png"), args.run_name)
        t0 = time.perf_counter()
        images, nrow = make_grid_images(diffusion, ema_denoiser, config, args, device)
        save_grid(images, os.path.join(args.save_dir, f"samples_{args.run_name}_epoch{epoch:03d}.png"), nrow)
        timing["sample_s"] += time.perf_counter() - t0
        is_best = val_loss < best_val
        best_val = min(best_val, val_loss)
        state = checkpoint(epoch)
        atomic_torch_save(state, os.path.join(ckpt_dir, "last.pt"))
        if is_best:
            atomic_torch_save({k: v for k, v in state.items() if k != "optimizer"}, os.path.join(ckpt_dir, "best.pt"))
        epoch_bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if verbose and not bars:
            print(f"epoch {epoch}/{args.epochs}  train {train_loss:.4f}  val {val_loss:.4f}  test {test_loss:.4f}",
                  flush=True)

    if args.save_model:
        atomic_torch_save(checkpoint(args.epochs), os.path.join(ckpt_dir, "ckpt.pt"))
    metrics = {"run_name": args.run_name, "device": str(device), "num_params": num_params, "steps": step,
               "train_images_per_s": step * args.batch_size / timing["train_s"] if timing["train_s"] else None,
               "timing": timing, "final": {k: v[-1] for k, v in history.items() if v}}
    write_json(metrics, os.path.join(args.save_dir, f"metrics_{args.run_name}.json"))
    if verbose:
        print(f"done: loss history {history_path}, checkpoints in {ckpt_dir}", flush=True)


# ------------------------------------------------------------------------------- inference

def inference(args):
    device = pick_device(args)
    ckpt = load_checkpoint(args.model_path)
    config = ckpt["config"]
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
    model = model.to(device).eval()
    use_cuda = device.type == "cuda"
    denoiser = Denoiser(model, compile=use_cuda and not args.no_compile, amp=use_cuda)
    diffusion = build_diffusion(config, device)
    torch.manual_seed(args.seed)

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


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    try:
        inference(args) if args.inference else train(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
