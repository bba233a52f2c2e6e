"""Guidance scale × guidance interval on one model: the referee's FID-1k and the sampling time of each cell.

Every cell samples 1,000 class-balanced images from --seed (0) with the model's sampler (or --sampler/--steps) at
guidance w, applied at every step ('all') or only where σ_lo < σ_t ≤ σ_hi, and reads their FID with the referee.
Cells already in --results are skipped; each finished cell is written there at once.

    python -u bench/guidance_table.py --model_path models/cifar10_cond_speedrun/ckpt.pt \\
        --scales 1.5,2,3 --intervals all,0.28:2.9,0.1:5 [--table]
"""
import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from noise import noise_mark, second_draw  # noqa: E402
from recipe_study import ROOT, referee_fid, run_logged  # noqa: E402
from ddpm_helpers import atomic_write_text  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=os.path.join(ROOT, "models", "cifar10_cond_speedrun", "ckpt.pt"))
    p.add_argument("--scales", default="1.5,2,3", help="comma-separated guidance scales w")
    p.add_argument("--intervals", default="all,0.28:2.9",
                   help="comma-separated intervals σ_lo:σ_hi (--guidance_interval LO,HI), or all")
    p.add_argument("--sampler_flags", default="", help="extra sampling flags, e.g. '--sampling_steps 25'")
    p.add_argument("--num_samples", type=int, default=1000, help="samples for the referee's FID")
    p.add_argument("--seed", type=int, default=0, help="the noise seed of every cell (another seed: another draw)")
    p.add_argument("--work", default="/tmp/guidance_table", help="where the samples and the log go")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "guidance_table.json"),
                   help="the results file, one entry per finished cell")
    p.add_argument("--referee", default=os.path.join(ROOT, "..", "shared", "tools", "referee_fid.py"))
    p.add_argument("--table", action="store_true", help="print the results as a markdown table and stop")
    return p


def measure_cell(a, w, interval, log_path):
    """Sample and read one cell; its results entry."""
    name = f"w{w}_{interval.replace(':', '-')}" + (f"_seed{a.seed}" if a.seed else "")
    command = [sys.executable, "-u", "ddpm_main.py", "--inference", "--conditional", "--model_path", a.model_path,
               "--guidance_scale", w, "--guidance_interval", interval.replace(":", ","), *a.sampler_flags.split(),
               "--num_samples", str(a.num_samples), "--sample_batch", "500", "--seed", str(a.seed), "--run_name", name,
               "--save_dir", a.work]
    seconds = run_logged(command, log_path)
    with open(log_path) as log:
        sampled = re.findall(r"(\d+) samples in ([0-9.]+) s on \S+?: (.*?)(?:\n|$)", log.read())
    fid, referee_s = referee_fid(a, os.path.join(a.work, f"samples_{name}.npz"), log_path)
    return {"guidance_scale": float(w), "interval": interval, "referee_fid": fid, "num_fid": a.num_samples,
            "fid_second_draw": second_draw(os.path.join(a.work, f"samples_{name}.npz")),
            "seed": a.seed, "sampling_s": float(sampled[-1][1]) if sampled else None, "command_s": seconds,
            "referee_s": referee_s,
            "model": os.path.relpath(a.model_path, ROOT), "sampler_flags": a.sampler_flags,
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "command": " ".join(command[1:])}


def print_table(results):
    """FID (± where a second draw lands) and sampling seconds of each cell; a cell whose difference from the best is
    inside its interval is marked noise."""
    scales = sorted({e["guidance_scale"] for e in results})
    intervals = list(dict.fromkeys(e["interval"] for e in results))
    cell = {(e["guidance_scale"], e["interval"]): e for e in results}
    best = min(results, key=lambda e: e["referee_fid"])
    print("| interval \\ w | " + " | ".join(f"{w:g}" for w in scales) + " |")
    print("|---" * (len(scales) + 1) + "|")
    text = lambda e: (f"{e['referee_fid']:.2f}" + (f" ± {e['fid_second_draw']:.2f}" if "fid_second_draw" in e else "")
                      + f" ({e['sampling_s']:.0f} s)" + ("" if e is best else noise_mark(
                          e["referee_fid"] - best["referee_fid"], e.get("fid_second_draw"))))
    for interval in intervals:
        row = [text(cell[w, interval]) if (w, interval) in cell else "—" for w in scales]
        print(f"| {interval} | " + " | ".join(row) + " |")


def main():
    a = build_parser().parse_args()
    results = json.load(open(a.results)) if os.path.exists(a.results) else []
    if a.table:
        return print_table(results)
    os.makedirs(a.work, exist_ok=True)
    log_path = os.path.join(a.work, "guidance_table.log")
    for interval in a.intervals.split(","):
        for w in a.scales.split(","):
            if any(e["guidance_scale"] == float(w) and e["interval"] == interval and e["sampler_flags"] == a.sampler_flags
                   and e.get("seed", 0) == a.seed and e["model"] == os.path.relpath(a.model_path, ROOT) for e in results):
                continue
            entry = measure_cell(a, w, interval, log_path)
            results.append(entry)
            atomic_write_text(json.dumps(results, indent=1) + "\n", a.results)
            print(f"{time.strftime('%H:%M')} w = {w}, {interval}: FID {entry['referee_fid']:.2f}, sampling "
                  f"{entry['sampling_s']} s", flush=True)


if __name__ == "__main__":
    main()
