"""The project's speed benchmark: the seed-style pipeline and the fast path side by side, in one run.

(a) seed-style: per-image torchvision transforms + DataLoader, fp32, eager, batch 64, default U-Net;
(b) fast path (ddpm_train_step.TrainingStep, the CLI's step): data resident on the device, autocast at each --precisions
    (fp16 with its loss scaler), channels_last, fused AdamW, torch.compile (--compile), no host sync per step — at
    each batch size given, for the default U-Net and for the DDPM-size U-Net (--dim 128 --dim_mults 1,2,2,2);
(c) sampling: 1,000 and 10,000 class-conditional CFG samples at T=100 with the default U-Net, at each precision.

    python bench/bench.py                  # on whatever device is present
    python bench/bench.py --smoke          # seconds on CPU: tiny sizes, checks that everything runs

Prints a table and writes JSON (--out). Training throughput is timed over --steps steps after
--warmup steps (compilation happens in the warm-up and is reported apart, as warmup_s).
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_data import DeviceLoader  # noqa: E402
from ddpm_diffusion import Diffusion, SamplerSettings, make_schedule  # noqa: E402
from ddpm_sample import generate  # noqa: E402
from ddpm_model import UNet, UNetConfig  # noqa: E402
from ddpm_runtime import COMPILE_CHOICES, Denoiser, choose_compile, synchronize  # noqa: E402
from ddpm_train_step import TrainingStep, build_loss_scaler, build_optimizer  # noqa: E402

MODELS = {"default (dim 32, 1,2,4)": dict(dim=32, dim_mults=(1, 2, 4)),
          "DDPM-size (dim 128, 1,2,2,2)": dict(dim=128, dim_mults=(1, 2, 2, 2))}


def synthetic_cifar(n, size, seed=0):
    """Random uint8 images (N, 3, H, W) and labels: throughput does not depend on pixel content."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def bench_seed_style(images, labels, device, model_kwargs, steps, warmup, timesteps, num_workers):
    """Per-image PIL → transforms → DataLoader, fp32 eager AdamW, batch 64: how the seed trains."""
    from PIL import Image
    from torchvision import transforms

    class PILDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.arrays = images.permute(0, 2, 3, 1).numpy()
            self.tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                          transforms.Normalize((0.5,) * 3, (0.5,) * 3)])

        def __len__(self):
            return len(self.arrays)

        def __getitem__(self, i):
            return self.tf(Image.fromarray(self.arrays[i])), int(labels[i])

    loader = torch.utils.data.DataLoader(PILDataset(), batch_size=64, shuffle=True, drop_last=True,
                                         num_workers=num_workers, persistent_workers=num_workers > 0)
    model = UNet(UNetConfig(num_classes=10, **model_kwargs)).to(device)
    diffusion = Diffusion(timesteps, lambda T: make_schedule("cosine", T), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    done, start = 0, None
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                synchronize(device)
                start = time.perf_counter()
            x, y = x.to(device), y.to(device)
            t = torch.randint(0, timesteps, (len(x),), device=device)
            loss = diffusion.p_losses(model, x, t, class_labels=y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the seed logs every step
            done += 1
            if done == warmup + steps:
                break
    synchronize(device)
    return steps * 64 / (time.perf_counter() - start)


def bench_fast(images, labels, device, model_kwargs, batch_size, steps, warmup, timesteps, compile_model,
               precision):
    """The CLI's TrainingStep on device-resident data; returns (img/s, warm-up seconds, peak GB, fp16 steps the
    loss scaler skipped)."""
    use_cuda = device.type == "cuda"
    model = UNet(UNetConfig(num_classes=10, **model_kwargs)).to(device, memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = build_optimizer(model, 1e-4)
    diffusion = Diffusion(timesteps, lambda T: make_schedule("cosine", T), device)
    denoiser = Denoiser(model, compile=compile_model, precision=precision)
    train_step = TrainingStep(model, ema_model, optimizer, diffusion, denoiser, p_uncond=0.1, loss_type="l2",
                              ema_decay=0.999, scaler=build_loss_scaler(precision, device))
    loader = DeviceLoader(images, labels, batch_size, device)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    batches, epoch = iter(()), 0
    t0 = time.perf_counter()
    loss_sum, skipped = torch.zeros((), device=device), torch.zeros((), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            warmup_s = time.perf_counter() - t0
            start = time.perf_counter()
        x = next(batches, None)
        if x is None or len(x[0]) < batch_size:  # keep one shape: start the next epoch's order
            epoch += 1
            batches = loader.batches(epoch)
            x = next(batches)
        loss, step_skipped = train_step(*x, step, lr=1e-4)
        loss_sum += loss
        skipped += step_skipped
    loss_sum.item()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if use_cuda else None
    return steps * batch_size / seconds, warmup_s, peak, int(skipped.item())


def bench_sampling(device, model_kwargs, counts, timesteps, size, sample_batch, compile_model, precision):
    """Seconds for `count` class-conditional CFG samples (w = 3, DDPM, T steps), default U-Net."""
    model = UNet(UNetConfig(num_classes=10, **model_kwargs)).to(device, memory_format=torch.channels_last).eval()
    denoiser = Denoiser(model, compile=compile_model, precision=precision)
    diffusion = Diffusion(timesteps, lambda T: make_schedule("cosine", T), device)
    timed = SamplerSettings("ddpm", guidance_scale=3.0)
    quick = SamplerSettings("ddim", steps=2, guidance_scale=3.0)
    warm = time.perf_counter()
    for shape in sorted({min(count, sample_batch) for count in counts} | {c % sample_batch for c in counts} - {0}):
        labels = torch.arange(shape, device=device) % 10  # compile for every batch shape the timed runs use
        generate(diffusion, denoiser, quick, shape, size, 3, labels, batch_size=shape)
    synchronize(device)
    results = {"warmup_s": time.perf_counter() - warm}
    for count in counts:
        labels = torch.arange(count, device=device) % 10
        synchronize(device)
        start = time.perf_counter()
        generate(diffusion, denoiser, timed, count, size, 3, labels, batch_size=sample_batch)
        synchronize(device)
        results[count] = time.perf_counter() - start
    return results


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, to check that it runs")
    p.add_argument("--batch_sizes", default="512,1024", help="fast-path batch sizes to try (default U-Net)")
    p.add_argument("--big_batch_sizes", default="256", help="fast-path batch sizes for the DDPM-size U-Net")
    p.add_argument("--precisions", help="fast-path precisions to time, comma-separated (default: bf16,fp16,fp32 on "
                   "CUDA; fp32,bf16 on a CPU, where fp16 is emulated and very slow; all three with --smoke)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--seed_steps", type=int, default=150, help="timed steps of the seed-style pipeline")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers for the seed-style pipeline")
    p.add_argument("--sample_counts", default="1000,10000", help="sample counts to time")
    p.add_argument("--sample_batch", type=int, default=5000, help="images per sampling batch")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help="torch.compile the U-Net: auto on CUDA only, as the CLI")
    p.add_argument("--out", default="outputs/bench.json", help="where the JSON goes")
    a = p.parse_args()
    a.device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    a.size, a.n, a.timesteps, a.models = 32, 45000, 100, MODELS
    if a.smoke:
        a.size, a.n, a.timesteps = 16, 256, 4
        a.batch_sizes, a.big_batch_sizes, a.sample_counts = "16", "8", "8,16"
        a.steps, a.warmup, a.seed_steps, a.workers, a.sample_batch = 2, 1, 2, 0, 8
        a.models = {"smoke: tiny (dim 8, 1,2)": dict(dim=8, dim_mults=(1, 2)),
                    "smoke: tiny (dim 8, 1,2,2)": dict(dim=8, dim_mults=(1, 2, 2))}
    default_precisions = "bf16,fp16,fp32" if a.device.type == "cuda" or a.smoke else "fp32,bf16"
    a.precisions = (a.precisions or default_precisions).split(",")
    a.compile_model = choose_compile(a.compile, a.device)
    return a


def bench_training(a, images, labels, result):
    """The fast path's rows: each model × batch size × precision."""
    for (label, kwargs), sizes in zip(a.models.items(), (a.batch_sizes, a.big_batch_sizes)):
        params = sum(p.numel() for p in UNet(UNetConfig(num_classes=10, **kwargs)).parameters())
        for batch in [int(b) for b in sizes.split(",")]:
            for precision in a.precisions:
                try:
                    ips, warm, peak, skipped = bench_fast(images, labels, a.device, kwargs, batch, a.steps, a.warmup,
                                                          a.timesteps, a.compile_model, precision)
                except torch.OutOfMemoryError:
                    print(f"fast {label} batch {batch} {precision}: out of memory", flush=True)
                    continue
                result["train"].append({"pipeline": "fast", "model": label, "params": params, "batch": batch,
                                        "precision": precision, "img_s": ips, "warmup_s": warm, "peak_gb": peak,
                                        "fp16_skipped_steps": skipped})
                save(result, a.out)
                print(f"fast {label} ({params / 1e6:.1f}M) batch {batch} {precision}: {ips:,.0f} img/s "
                      f"(warm-up {warm:.0f} s, peak {peak or 0:.1f} GB)", flush=True)


def save(result, path):
    """The JSON as it stands, rewritten after every measurement: a run killed part-way keeps what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def print_tables(a, result):
    seed = result["train"][0]
    print("\n| pipeline | model | batch | precision | img/s | × seed-style | 45k-image epoch (s) | warm-up (s) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| seed-style | {seed['model']} | 64 | fp32 | {seed['img_s']:,.0f} | 1.0 | {45000 / seed['img_s']:.1f} | |")
    for row in result["train"][1:]:
        print(f"| fast | {row['model']} | {row['batch']} | {row['precision']} | {row['img_s']:,.0f} | "
              f"{row['img_s'] / seed['img_s']:.1f} | {45000 / row['img_s']:.2f} | {row['warmup_s']:.0f} |")
    print(f"\n| CFG samples (T={a.timesteps}, w=3, DDPM) | precision | seconds | img/s |")
    print("|---|---|---|---|")
    for precision, sampling in result["sampling"]["seconds"].items():
        for count, seconds in sampling.items():
            print(f"| {int(count):,} | {precision} | {seconds:.2f} | {int(count) / seconds:,.0f} |")


def main():
    a = parse_args()
    device = a.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    images, labels = synthetic_cifar(a.n, a.size)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, compile={a.compile_model}, precisions {','.join(a.precisions)}, "
          f"smoke={a.smoke}", flush=True)

    result = {"device": name, "torch": torch.__version__, "smoke": a.smoke, "compile": a.compile_model,
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv), "train": []}
    default_label = next(iter(a.models))
    seed_ips = bench_seed_style(images, labels, device, a.models[default_label], a.seed_steps, 5 if not a.smoke else 1,
                                a.timesteps, a.workers)
    result["train"].append({"pipeline": "seed-style", "model": default_label, "batch": 64, "precision": "fp32",
                            "img_s": seed_ips})
    print(f"seed-style (DataLoader, {a.workers} workers, fp32, batch 64): {seed_ips:,.0f} img/s", flush=True)
    save(result, a.out)
    bench_training(a, images, labels, result)
    counts = [int(c) for c in a.sample_counts.split(",")]
    result["sampling"] = {"timesteps": a.timesteps, "guidance_scale": 3.0, "sample_batch": a.sample_batch,
                          "warmup_s": {}, "seconds": {}}
    for precision in a.precisions:
        sampling = bench_sampling(device, a.models[default_label], counts, a.timesteps, a.size, a.sample_batch,
                                  a.compile_model, precision)
        result["sampling"]["warmup_s"][precision] = sampling["warmup_s"]
        result["sampling"]["seconds"][precision] = {str(c): sampling[c] for c in counts}
        print(f"sampling {precision}: " + ", ".join(f"{c:,} in {sampling[c]:.2f} s" for c in counts), flush=True)
        save(result, a.out)
    if device.type == "cuda":
        result["peak_gb_overall"] = torch.cuda.max_memory_allocated() / 1e9
    best = {}
    for row in result["train"][1:]:
        if row["img_s"] > best.get(row["model"], {}).get("img_s", 0):
            best[row["model"]] = row
    result["best"] = best
    if default_label in best:
        result["speedup_default_vs_seed"] = best[default_label]["img_s"] / seed_ips
    print_tables(a, result)
    save(result, a.out)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
