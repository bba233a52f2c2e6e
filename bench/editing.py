"""Inversion, inpainting and interpolation on a trained model: PSNR, the filled region's error, FID and seconds.

    python bench/editing.py --model_path models/cifar10_cond_speedrun/ckpt.pt --data_dir /tmp/cifar10 \
        --referee ../shared/tools/referee_fid.py --ref_stats ../shared/fid/cifar10-jpeg-train-stats.npz

Test images are spread evenly over the test split (as the CLI's default picks them), class-guided by their own
labels. Parts, each printed and written to --results as it finishes:
- inversion: --inversion_images images to x_T by DDIM (η = 0) and back at each of --inversion_steps; PSNR of the
  8-bit reconstructions (mean, and its standard error over images) and seconds;
- inpainting: the centre square (a quarter of the pixels) of --inpainting_images images filled by RePaint with the
  CLI's defaults; the filled region's RMSE (in 8-bit levels) and PSNR against the originals, beside a baseline that
  pastes there the centre of class-guided samples of the same classes (the checkpoint's sampler: samples that never
  saw the known region); the referee's FID of both sets of completed images against --ref_stats; seconds;
- originals: the referee's FID of the inpainting part's test images, unedited (what completions can approach);
- interpolation: seconds for a strip of --frames between two test images (both inverted, then the frames decoded).
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ddpm_checkpoint import load_sampling_model  # noqa: E402
from ddpm_config import saved_sampler_settings  # noqa: E402
from ddpm_data import trained_data  # noqa: E402
from ddpm_data import evenly_spread, load_dataset  # noqa: E402
from ddpm_editing import Inputs, decode, fill_masks, inpaint, invert, psnr, write_interpolation  # noqa: E402
from ddpm_helpers import RunFiles  # noqa: E402
from ddpm_pictures import to_model_range, to_uint8  # noqa: E402
from ddpm_jobs import EDITING_STEPS, JOB  # noqa: E402
from ddpm_sample import describe_sampling, prepare_sampler, sampler_settings  # noqa: E402
from noise import REF_STATS, noise_mark, second_draw  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="models/cifar10_cond_speedrun/ckpt.pt")
    p.add_argument("--data_dir", required=True, help="the model's data as an image folder (train/, test/)")
    p.add_argument("--referee", help="referee_fid.py (without it: no FID)")
    p.add_argument("--ref_stats", help="the referee's reference statistics (mu, sigma)")
    p.add_argument("--parts", default="inversion,inpainting,originals,interpolation")
    p.add_argument("--inversion_images", type=int, default=100)
    p.add_argument("--inversion_steps", default="15,50,250")
    p.add_argument("--inpainting_images", type=int, default=1000)
    p.add_argument("--jump_length", type=int, default=5)
    p.add_argument("--jump_count", type=int, default=5)
    p.add_argument("--steps", type=int, default=EDITING_STEPS, help="RePaint's and the interpolation's steps")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default="outputs/bench_editing")
    p.add_argument("--results", default="bench/editing.json")
    return p.parse_args()


def sampler_for(job, ckpt, model, steps, batch_size=1000):
    config = ckpt["config"]
    settings = sampler_settings({"steps": steps} if steps else {}, saved_sampler_settings(config), config["timesteps"],
                                JOB[job].sampler)
    return prepare_sampler(model, config, settings, torch.device("cpu"), "auto", "auto", batch_size, True,
                           (job, describe_sampling(settings)))


def inversion(args, ckpt, model, images, labels):
    rows = []
    for steps in map(int, args.inversion_steps.split(",")):
        sampler = sampler_for("invert", ckpt, model, steps)
        start = time.perf_counter()
        reconstructions = decode(sampler, invert(sampler, images, labels), labels)
        seconds = time.perf_counter() - start
        scores = psnr(images, reconstructions)
        rows.append({"ddim_steps": steps, "images": len(images), "psnr_db_mean": float(scores.mean()),
                     "psnr_db_std_error": float(scores.std(ddof=1) / math.sqrt(len(scores))),
                     "seconds": seconds, "seconds_per_image": seconds / len(images)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def region_error(originals_uint8, completed, fill):
    """RMSE (8-bit levels) and PSNR (dB) over the filled pixels of all images."""
    error = to_uint8(completed).astype(np.float64) - originals_uint8.permute(0, 2, 3, 1).numpy()
    inside = fill[:, 0].bool().numpy()
    mse = (error[inside] ** 2).mean()
    return math.sqrt(mse), 10 * math.log10(255 ** 2 / mse)


def referee_fid(args, images, name):
    if not args.referee:
        return None
    path = os.path.join(args.out_dir, f"{name}.npz")
    np.savez(path, images=to_uint8(images))
    command = [sys.executable, args.referee, path] + (["--ref", args.ref_stats] if args.ref_stats else [])
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    fid = float(re.findall(r"FID ([0-9.]+)", out)[-1])
    width = second_draw(path, ref_stats=args.ref_stats or REF_STATS)
    print(f"{name}: referee FID {fid:.2f} ± {width:.2f} (where a second draw lands)", flush=True)
    return fid, width


def inpainting(args, ckpt, model, images, labels):
    sampler = sampler_for("inpaint", ckpt, model, args.steps)
    fill = fill_masks("centre", len(images), trained_data(ckpt["config"])["data_size"], args.seed)
    start = time.perf_counter()
    completed = inpaint(sampler, images, fill, labels, args.jump_length, args.jump_count, args.seed, progress=True)
    seconds = time.perf_counter() - start
    rmse, region_psnr = region_error(images, completed, fill)
    row = {"images": len(images), "steps": args.steps, "jump_length": args.jump_length, "jump_count": args.jump_count,
           "seconds": seconds, "seconds_per_image": seconds / len(images), "region_rmse_8bit": rmse,
           "region_psnr_db": region_psnr}
    print(json.dumps(row), flush=True)
    baseline_sampler = prepare_sampler(model, ckpt["config"], saved_sampler_settings(ckpt["config"]),
                                       torch.device("cpu"), "auto", "auto", 1000, True, ("baseline", ""))
    start = time.perf_counter()
    samples = baseline_sampler.sample(len(images), labels, seed=args.seed, progress=True)
    pasted = to_model_range(images) * (1 - fill) + samples * fill
    baseline_rmse, baseline_psnr = region_error(images, pasted, fill)
    row.update({"baseline": f"the centre of class-guided samples ({describe_sampling(baseline_sampler.settings)})",
                "baseline_seconds": time.perf_counter() - start, "baseline_region_rmse_8bit": baseline_rmse,
                "baseline_region_psnr_db": baseline_psnr})
    row["fid_completed"], row["fid_completed_second_draw"] = referee_fid(args, completed, "inpainted") or (None, None)
    row["fid_baseline"], row["fid_baseline_second_draw"] = referee_fid(args, pasted, "baseline") or (None, None)
    if row["fid_completed"] is not None:
        print(f"completed − pasted baseline: {row['fid_completed'] - row['fid_baseline']:+.2f}"
              + noise_mark(row["fid_completed"] - row["fid_baseline"], row["fid_completed_second_draw"]), flush=True)
    print(json.dumps(row), flush=True)
    return row


def originals(args, ckpt, model, images, labels):
    """The referee's FID of the inpainting part's test images as they are: the figure completions can approach."""
    fid, width = referee_fid(args, to_model_range(images), "originals") or (None, None)
    row = {"images": len(images), "fid": fid, "fid_second_draw": width}
    print(json.dumps(row), flush=True)
    return row


def interpolation(args, ckpt, model, images, labels):
    sampler = sampler_for("interpolate", ckpt, model, args.steps)
    inputs = Inputs([images[0], images[-1]], labels[[0, -1]], ["first", "last"], [None, None])
    start = time.perf_counter()
    write_interpolation(sampler, inputs, args.frames, RunFiles("models", args.out_dir, "bench"), verbose=False)
    row = {"frames": args.frames, "steps": args.steps, "seconds": time.perf_counter() - start}
    print(json.dumps(row), flush=True)
    return row


def main():
    args = parse_args()
    torch.set_grad_enabled(False)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt, model = load_sampling_model(args.model_path)
    data = load_dataset(args.data_dir, "folder")
    results = {"model_path": args.model_path, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d")}
    parts = {"inversion": (inversion, args.inversion_images), "inpainting": (inpainting, args.inpainting_images),
             "originals": (originals, args.inpainting_images), "interpolation": (interpolation, 2)}
    for name in args.parts.split(","):
        run, count = parts[name]
        chosen = evenly_spread(torch.arange(len(data["test_images"])), count)
        results[name] = run(args, ckpt, model, data["test_images"][chosen], data["test_labels"][chosen])
        with open(args.results, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
