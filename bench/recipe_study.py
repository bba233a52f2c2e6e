"""The recipe study: what 20 minutes of CPU training steps buy, one change to the shipped model's recipe per row,
then the changes that helped, together.

Each row trains a conditional model on the offline pack for a fixed budget of training time (ddpm_main.py
--time_budget_min: steps only, decoding and evaluation apart), samples 1,000 class-balanced images with the
shipped model's sampler (DPM-Solver++(2M), 15 steps, λ spacing, w = 1.5, seed 0) and reads their FID with the
referee. Rows already in --results are skipped, so the study can be stopped and continued; each finished row is
written there at once.

    python -u bench/recipe_study.py --data_dir /tmp/cifar10 [--rows shipped,shipped_seed1] [--work /tmp/study]

--list prints the rows. The markdown table of the results: --table.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ddpm_helpers import atomic_write_text  # noqa: E402
from noise import noise_mark, second_draw  # noqa: E402

# The shipped model's recipe (BENCHMARKS.md, "The shipped model"), at today's default precision: bf16 where the CPU
# has it natively (the shipped model itself was trained in float32, before bf16 training existed; see the fp32 row).
SHIPPED_RECIPE = ["--conditional", "--dim", "48", "--dim_mults", "1,2,2", "--batch_size", "64", "--lr", "1e-3",
                  "--warmup_steps", "200", "--lr_decay", "cosine", "--ema_decay", "0.999", "--timesteps", "1000",
                  "--schedule", "cosine"]
SHIPPED_SAMPLER = ["--sampler", "dpm++2m", "--sampling_steps", "15", "--spacing", "lambda", "--guidance_scale", "1.5"]

# name: (flags added to the shipped recipe, what the row changes). In the order they are run; the last rows combine
# the single changes that measured better.
ROWS = {
    "shipped": ([], "the shipped model's recipe"),
    "shipped_seed1": (["--seed", "1"], "the same, training seed 1 (the noise floor of one seed)"),
    "lr_2e-3": (["--lr", "2e-3"], "lr 1e-3 → 2e-3"),
    "lr_4e-3": (["--lr", "4e-3"], "lr 1e-3 → 4e-3"),
    "batch_128": (["--batch_size", "128"], "batch 64 → 128"),
    "v_target": (["--prediction", "v"], "ε → v target"),
    "min_snr_5": (["--min_snr_gamma", "5"], "Min-SNR loss weighting, γ = 5"),
    "dim_64": (["--dim", "64"], "width 48 → 64 channels"),
    "stages_1222": (["--dim", "32", "--dim_mults", "1,2,2,2"], "4 stages of 32·(1,2,2,2) instead of 3 of 48·(1,2,2)"),
    "attn_8": (["--attn_resolutions", "8"], "attention only at 8×8 (not 16×16 and 8×8)"),
    "dropout_0.1": (["--dropout", "0.1"], "dropout 0 → 0.1"),
    "T_100": (["--timesteps", "100"], "T 1000 → 100"),
    "batch_32": (["--batch_size", "32"], "batch 64 → 32"),
    "no_ema": (["--ema_decay", "0"], "no EMA: sample the trained weights"),
    "fp32": (["--precision", "fp32"], "float32 training (as the shipped model was trained) instead of bf16"),
    "lr_2e-3_attn_8": (["--lr", "2e-3", "--attn_resolutions", "8"], "the two best single changes together"),
    "lr_2e-3_attn_8_batch_32": (["--lr", "2e-3", "--attn_resolutions", "8", "--batch_size", "32"],
                                "the three single changes that helped together"),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="/tmp/cifar10", help="image-folder CIFAR-10 (train/, test/)")
    p.add_argument("--rows", help="comma-separated row names (default: every row, in order)")
    p.add_argument("--minutes", type=float, default=20.0, help="training-time budget of each row")
    p.add_argument("--num_samples", type=int, default=1000, help="samples for the referee's FID")
    p.add_argument("--work", default="/tmp/study", help="where the runs' checkpoints and samples go")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "recipe_study.json"),
                   help="the results file, one entry per finished row")
    p.add_argument("--referee", default=os.path.join(ROOT, "..", "shared", "tools", "referee_fid.py"))
    p.add_argument("--list", action="store_true", help="print the rows and stop")
    p.add_argument("--table", action="store_true", help="print the results as a markdown table and stop")
    return p


def run_logged(command, log_path):
    """Run command with its output appended to log_path; the seconds it took. A failure stops the study."""
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        sys.exit(f"failed ({code}): {' '.join(command)}; see {log_path}")
    return time.perf_counter() - start


def referee_fid(a, samples_path, log_path):
    """The referee's FID of the npz at samples_path (its last line: 'FID <v> (n=<N>)') and its seconds."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, a.referee, samples_path, "--device", "cpu"], capture_output=True,
                         text=True)
    with open(log_path, "a") as log:
        log.write(out.stdout + out.stderr)
    match = re.search(r"FID ([0-9.]+) \(n=(\d+)\)", out.stdout)
    if out.returncode or not match:
        sys.exit(f"the referee failed on {samples_path}; see {log_path}")
    return float(match.group(1)), time.perf_counter() - start


def run_row(a, name, flags):
    """Train, sample and measure one row; its results entry."""
    out, models = os.path.join(a.work, "out"), os.path.join(a.work, "models")
    log_path = os.path.join(a.work, f"{name}.log")
    train = [sys.executable, "-u", "ddpm_main.py", "--data_dir", a.data_dir, *SHIPPED_RECIPE, *flags,
             "--epochs", "1000", "--time_budget_min", f"{a.minutes:g}", "--eval_every", "1000",
             "--checkpoint_every", "1000", "--save_model", "--run_name", name, "--save_dir", out,
             "--models_dir", models]
    load_before = os.getloadavg()[0]
    train_wall = run_logged(train, log_path)
    metrics = json.load(open(os.path.join(out, f"metrics_{name}.json")))
    sample_name = f"{name}_fid"
    sample = [sys.executable, "-u", "ddpm_main.py", "--inference", "--conditional", "--model_path",
              os.path.join(models, name, "ckpt.pt"), *SHIPPED_SAMPLER, "--num_samples", str(a.num_samples),
              "--sample_batch", "500", "--seed", "0", "--run_name", sample_name, "--save_dir", out, "--quiet"]
    sample_wall = run_logged(sample, log_path)
    fid, referee_s = referee_fid(a, os.path.join(out, f"samples_{sample_name}.npz"), log_path)
    return {"row": name, "flags": flags, "change": ROWS[name][1], "referee_fid": fid, "num_fid": a.num_samples,
            "fid_second_draw": second_draw(os.path.join(out, f"samples_{sample_name}.npz")),
            "steps": metrics["steps"], "batch_size": metrics["batch_size"], "num_params": metrics["num_params"],
            "precision": metrics["precision"], "train_images_per_s": metrics["train_images_per_s"],
            "train_s": metrics["timing"]["train_s"], "final_losses": metrics["final"],
            "seconds": {"train_command": train_wall, "sampling_command": sample_wall, "referee": referee_s},
            "load_1min_before": load_before, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "code": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.strip(),
            "command": " ".join(["python", "ddpm_main.py", *SHIPPED_RECIPE, *flags, "--time_budget_min",
                                 f"{a.minutes:g}", "..."])}


def print_table(results):
    """The results as BENCHMARKS.md shows them: each row against the mean of the shipped recipe's two seeds, and
    whether the difference is beyond the two seeds' own difference (the noise floor) and where a second draw of the
    row's samples lands (rows measured since it exists)."""
    by_row = {entry["row"]: entry for entry in results}
    seeds = [by_row[n]["referee_fid"] for n in ("shipped", "shipped_seed1") if n in by_row]
    base, floor = (sum(seeds) / len(seeds), abs(seeds[0] - seeds[-1])) if seeds else (None, None)
    print(f"base: python ddpm_main.py {' '.join(SHIPPED_RECIPE)} --time_budget_min 20 --epochs 1000 --data_dir DIR; "
          f"shipped recipe {base:.2f} ± {floor / 2:.2f} (two seeds)" if seeds else "no shipped rows yet")
    print("| row | flags added | referee FID-1k | Δ | steps × batch | train img/s |")
    print("|---|---|---|---|---|---|")
    for entry in results:
        delta = entry["referee_fid"] - base if base is not None else None
        width = entry.get("fid_second_draw")
        verdict = ("" if delta is None or entry["row"].startswith("shipped")
                   else " (within the noise floor)" if abs(delta) <= floor else noise_mark(delta, width))
        fid = f"{entry['referee_fid']:.2f}" + (f" ± {width:.2f}" if width is not None else "")
        print(f"| {entry['row']} | `{' '.join(entry['flags']) or '(none)'}` | {fid} | "
              + (f"{delta:+.1f}{verdict}" if delta is not None else "—")
              + f" | {entry['steps']:,} × {entry['batch_size']} | {entry['train_images_per_s']:.1f} |")


def main():
    a = build_parser().parse_args()
    results = json.load(open(a.results)) if os.path.exists(a.results) else []
    if a.list:
        width = max(map(len, ROWS))
        for name, (flags, change) in ROWS.items():
            print(f"{name:{width}} {change}: {' '.join(flags) or '(as shipped)'}")
        return
    if a.table:
        return print_table(results)
    names = a.rows.split(",") if a.rows else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; --list shows them")
    os.makedirs(a.work, exist_ok=True)
    for name in names:
        if any(entry["row"] == name for entry in results):
            continue
        print(f"{time.strftime('%H:%M')} {name}: {ROWS[name][1]}", flush=True)
        entry = run_row(a, name, ROWS[name][0])
        results.append(entry)
        atomic_write_text(json.dumps(results, indent=1) + "\n", a.results)
        print(f"{time.strftime('%H:%M')} {name}: FID {entry['referee_fid']:.2f}, {entry['steps']} steps", flush=True)


if __name__ == "__main__":
    main()
