"""The table that decides the default steps: spacing {λ-uniform, EDM's ρ = 7, fitted} × solver {dpm++2m, dpm++3m} ×
steps on one model at its stored guidance, each cell's FID-1k (± where a second draw lands), KID, precision/recall
and copies from the tool's --eval_fid (its FID agrees with the referee's: bench/fid_protocol.py; --referee also reads
the referee's), then seconds per 1,000 images timed apart, interleaved.

The fitted steps come from one teacher run (ddpm_fit_steps: 256 noises, the 100-step teacher at the model's settings)
and its cost matrix, cut for each step count — what --fit_steps N computes for one N; the fit's own seconds are
recorded. The rows "fitted_rms" keep the first fit's (plain RMS cost, results['fit_rms']; ddpm_fit_steps's
COST_SIGMA_POWER now 0.5). Cells already in --results are skipped; each finished cell is written there at once.

    python -u bench/step_table.py --data_dir /tmp/cifar10 --steps 8,15 [--seeds 0,1,2] [--cells lambda-2m,fitted-3m]
    python -u bench/step_table.py --timing --steps 8,15 --cells fitted-3m,lambda-2m
    python bench/step_table.py --table
"""
import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from noise import WEIGHTS, noise_mark  # noqa: E402
from recipe_study import ROOT, referee_fid, run_logged  # noqa: E402
from ddpm_checkpoint import load_sampling_model  # noqa: E402
from ddpm_config import saved_sampler_settings  # noqa: E402
from ddpm_data import evenly_spread, load_dataset  # noqa: E402
from ddpm_diffusion import SamplerSettings  # noqa: E402
from ddpm_editing import ddim_invert, model_images, psnr  # noqa: E402
from ddpm_fit_steps import COST_SIGMA_POWER, FIT_SAMPLES, cheapest_path, step_costs, teacher_trajectories  # noqa: E402
from ddpm_helpers import atomic_write_text, sanitized_run_name  # noqa: E402
from ddpm_sample import balanced_labels, prepare_sampler  # noqa: E402

SPACINGS = ("lambda", "karras", "fitted", "fitted_rms")  # fitted_rms: the first fit (plain RMS cost), a row kept
SOLVERS = ("2m", "3m")
METRICS = ("fid", "fid_second_draw", "kid", "kid_std", "prc_precision", "prc_recall", "copy_share",
           "copy_share_pixels")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=os.path.join(ROOT, "models", "cifar10_cond_speedrun", "ckpt.pt"))
    p.add_argument("--data_dir", default="/tmp/cifar10", help="the model's data (FID's reference and copy check)")
    p.add_argument("--steps", default="8,15,5,6,10", help="comma-separated step counts, run in this order")
    p.add_argument("--cells", default=",".join(f"{s}-{o}" for s in SPACINGS[:3] for o in SOLVERS),
                   help="comma-separated spacing-solver cells, e.g. lambda-2m,fitted-3m")
    p.add_argument("--seeds", default="0", help="comma-separated noise seeds of the samples")
    p.add_argument("--num_samples", type=int, default=1000, help="samples for FID")
    p.add_argument("--sampler_flags", default="", help="more sampling flags, e.g. '--guidance_scale 4' (a cell apart)")
    p.add_argument("--fid_inception", default=WEIGHTS, help="the Inception weights file (torch-fidelity's)")
    p.add_argument("--referee", action="store_true", help="also read each cell's samples with the referee")
    p.add_argument("--referee_path", default=os.path.join(ROOT, "..", "shared", "tools", "referee_fid.py"))
    p.add_argument("--timing", action="store_true", help="time sampling 1,000 images of each cell instead (no FID)")
    p.add_argument("--inversion", action="store_true",
                   help="instead: PSNR of 100 test images DDIM-inverted and decoded on DDIM's steps and the fitted")
    p.add_argument("--rounds", type=int, default=2, help="--timing: interleaved rounds")
    p.add_argument("--work", default="/tmp/step_table", help="where the samples and the log go")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "step_table.json"))
    p.add_argument("--table", action="store_true", help="print the results as markdown tables and stop")
    return p


def fitted_steps(a, results, counts):
    """results['fit']: the fitted timesteps of each step count from one teacher run and its seconds."""
    fit = results.get("fit", {})
    if all(str(n) in fit.get("timesteps", {}) for n in counts):
        return fit
    start = time.perf_counter()
    ckpt, model = load_sampling_model(a.model_path)
    config = ckpt["config"]
    sampler = prepare_sampler(model, config, saved_sampler_settings(config), torch.device("cpu"), "auto", "off", 1000,
                              True, ("fitting", "the stored settings"))
    labels = balanced_labels(config, FIT_SAMPLES, sampler.device)
    grid, states, x_zeros, _ = teacher_trajectories(sampler, labels, FIT_SAMPLES, 0, progress=True)
    teacher_s = time.perf_counter() - start
    costs = step_costs(sampler.diffusion, grid, states, x_zeros)
    fit = {"timesteps": {str(n): [grid[i] for i in cheapest_path(costs, n)[0]] for n in counts},
           "teacher_s": teacher_s, "fit_s": time.perf_counter() - start, "samples": FIT_SAMPLES,
           "cost_sigma_power": COST_SIGMA_POWER,
           "teacher_steps": len(grid), "date": time.strftime("%Y-%m-%d %H:%M")}
    results["fit"] = fit
    return fit


def cell_flags(spacing, solver, steps, fits):
    """The sampling flags of one cell (fits: the fitted timesteps of each fitted spacing)."""
    placed = ["--sampling_timesteps", ",".join(map(str, fits[spacing]["timesteps"][str(steps)]))] \
        if spacing in fits else ["--sampling_steps", str(steps), "--spacing", spacing]
    return ["--sampler", f"dpm++{solver}", *placed]


def measure_cell(a, spacing, solver, steps, seed, fits, log_path):
    """Sample and read one cell with --eval_fid; its results entry."""
    name = sanitized_run_name(f"{spacing}_{solver}_{steps}_seed{seed}" + "".join(a.sampler_flags.split()))
    flags = [*cell_flags(spacing, solver, steps, fits), *a.sampler_flags.split()]
    command = [sys.executable, "-u", "ddpm_main.py", "--inference", "--conditional", "--model_path", a.model_path,
               *flags, "--eval_fid", str(a.num_samples), "--fid_inception", a.fid_inception, "--data_dir", a.data_dir,
               "--sample_batch", "500",
               "--seed", str(seed), "--run_name", name, "--save_dir", a.work]
    seconds = run_logged(command, log_path)
    with open(os.path.join(a.work, f"metrics_{name}.json")) as f:
        metrics = json.load(f)
    entry = {"spacing": spacing, "solver": solver, "steps": steps, "seed": seed, "flags": " ".join(flags),
             "sampler_flags": a.sampler_flags,
             **{key: metrics[key] for key in METRICS}, "command_s": seconds, "num_fid": a.num_samples,
             "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}
    if a.referee:
        entry["referee_fid"], _ = referee_fid(argparse.Namespace(referee=a.referee_path),
                                              os.path.join(a.work, f"fid_samples_{name}.npz"), log_path)
    return entry


def time_cells(a, cells, counts, fits, log_path):
    """Seconds to sample 1,000 images of each cell (one process each, --sample_batch 500), interleaved rounds."""
    times = {}
    for _ in range(a.rounds):
        for steps in counts:
            for spacing, solver in cells:
                command = [sys.executable, "-u", "ddpm_main.py", "--inference", "--conditional", "--model_path",
                           a.model_path, *cell_flags(spacing, solver, steps, fits), "--num_samples", "1000",
                           "--sample_batch", "500", "--run_name", "timing", "--save_dir", a.work]
                run_logged(command, log_path)
                with open(log_path) as log:
                    seconds = float(re.findall(r"1000 samples in ([0-9.]+) s", log.read())[-1])
                times.setdefault(f"{spacing}-{solver}-{steps}", []).append(seconds)
                print(f"{spacing}-{solver} {steps} steps: {seconds} s", flush=True)
    return {"per_1000_s": times, "machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d %H:%M")}


@torch.no_grad()
def inversion_psnr(a, counts, fit, count=100):
    """PSNR (dB, mean and standard error) of `count` test images spread over the split, inverted by DDIM (η = 0, w = 1,
    their own labels) and decoded back on the same steps: DDIM's own (even in t) and the fitted, per step count."""
    ckpt, model = load_sampling_model(a.model_path)
    config = ckpt["config"]
    sampler = prepare_sampler(model, config, SamplerSettings("ddim", guidance_scale=1.0), torch.device("cpu"), "auto",
                              "off", 1000, False, None)
    data = load_dataset(a.data_dir, "folder")
    chosen = evenly_spread(torch.arange(len(data["test_images"])), count)
    images, labels = data["test_images"][chosen], data["test_labels"][chosen]
    diffusion, rows = sampler.diffusion, []
    for n in counts:
        for spacing, steps in (("time", diffusion.sampling_timesteps(n, "time")), ("fitted", fit["timesteps"][str(n)])):
            start, scales = time.perf_counter(), [1.0] * n
            noises = ddim_invert(diffusion, sampler.denoiser, model_images(sampler, images), steps, labels, scales)
            back = sampler.to_data_size(diffusion.ddim(sampler.denoiser, noises, steps, labels, scales).clamp(-1, 1))
            scores = psnr(images, back)
            rows.append({"steps": n, "spacing": spacing, "timesteps": steps, "psnr_db_mean": float(scores.mean()),
                         "psnr_db_std_error": float(scores.std(ddof=1) / count ** 0.5),
                         "seconds": time.perf_counter() - start, "images": count})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(results):
    """Per seed: a row per spacing-solver, a column per step count; FID ± second draw, a cell inside the best's
    interval marked noise; then KID and precision/recall."""
    cells = results.get("cells", [])
    for seed in sorted({e["seed"] for e in cells}):
        mine = [e for e in cells if e["seed"] == seed and not e.get("sampler_flags")]
        counts = sorted({e["steps"] for e in mine})
        print(f"\nseed {seed}: FID-1k ± second draw (KID ×10³, precision / recall)\n")
        print("| spacing, solver | " + " | ".join(f"{n} steps" for n in counts) + " |")
        print("|---" * (len(counts) + 1) + "|")
        for spacing in SPACINGS:
            for solver in SOLVERS:
                row = []
                for n in counts:
                    e = next((e for e in mine if (e["spacing"], e["solver"], e["steps"]) == (spacing, solver, n)),
                             None)
                    best = min((o for o in mine if o["steps"] == n), key=lambda o: o["fid"])
                    row.append("—" if e is None else
                               f"{e['fid']:.2f} ± {e['fid_second_draw']:.2f} ({e['kid'] * 1e3:.1f}, "
                               f"{e['prc_precision']:.3f} / {e['prc_recall']:.3f})"
                               + ("" if e is best else noise_mark(e["fid"] - best["fid"], e["fid_second_draw"])))
                if any(r != "—" for r in row):
                    print(f"| {spacing}, dpm++{solver} | " + " | ".join(row) + " |")
    if "timing" in results:
        print("\nseconds per 1,000 images (each round):\n")
        for cell, seconds in results["timing"]["per_1000_s"].items():
            print(f"- {cell}: {', '.join(f'{s:.1f}' for s in seconds)}")


def main():
    a = build_parser().parse_args()
    results = json.load(open(a.results)) if os.path.exists(a.results) else {}
    if a.table:
        return print_table(results)
    os.makedirs(a.work, exist_ok=True)
    log_path = os.path.join(a.work, "step_table.log")
    counts = [int(n) for n in a.steps.split(",")]
    cells = [tuple(cell.split("-")) for cell in a.cells.split(",")]
    fit = fitted_steps(a, results, counts) if any(spacing == "fitted" for spacing, _ in cells) else results.get("fit")
    fits = {"fitted": fit, "fitted_rms": results.get("fit_rms")}
    atomic_write_text(json.dumps(results, indent=1) + "\n", a.results)
    if a.timing or a.inversion:
        results["timing" if a.timing else "inversion"] = time_cells(a, cells, counts, fits, log_path) if a.timing \
            else inversion_psnr(a, counts, fit)
        return atomic_write_text(json.dumps(results, indent=1) + "\n", a.results)
    for seed in (int(s) for s in a.seeds.split(",")):
        for steps in counts:
            for spacing, solver in cells:
                done = [e for e in results.get("cells", []) if (e["spacing"], e["solver"], e["steps"], e["seed"],
                                                                 e.get("sampler_flags", "")) ==
                        (spacing, solver, steps, seed, a.sampler_flags)]
                if done and (done[0].get("referee_fid") is not None or not a.referee):
                    continue
                entry = measure_cell(a, spacing, solver, steps, seed, fits, log_path)
                results["cells"] = [e for e in results.get("cells", []) if e not in done] + [entry]
                atomic_write_text(json.dumps(results, indent=1) + "\n", a.results)
                print(f"{time.strftime('%H:%M')} {spacing}-{solver} {steps} steps seed {seed}: FID "
                      f"{entry['fid']:.2f} ± {entry['fid_second_draw']:.2f}, precision {entry['prc_precision']:.3f}, "
                      f"recall {entry['prc_recall']:.3f}", flush=True)


if __name__ == "__main__":
    main()
