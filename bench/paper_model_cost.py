"""What Ho et al.'s CIFAR-10 network costs on this machine once imported: the import itself, sampling seconds per
image with DPM-Solver++(2M) in 15 steps and with the paper's 1,000 ancestral steps (σ_t² = β_t), and the bound's
seconds per image (--eval_nll), each through the CLI as a user runs it. The published weights cannot be fetched here,
so the network has random weights in pesser/pytorch_diffusion's format: the cost is the network's, not its weights'.

    python bench/paper_model_cost.py --data_dir /tmp/cifar10 --out /tmp/paper_cost

Prints each command, its wall seconds (the process's, start-up and loading included) and the seconds per image of the
work itself (as the CLI reports it: the sampling time it prints, the bound's seconds_per_image), and writes them to
<out>/paper_model_cost.json.
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
from ddpm_presets import preset_network  # noqa: E402
from ddpm_interop import foreign_weights  # noqa: E402
from ddpm_model import DDPMUNet  # noqa: E402


def write_random_pesser_file(path):
    """The paper's network with random weights, saved under pesser's names as model-790000.ckpt is."""
    torch.manual_seed(0)
    network = preset_network("ddpm_cifar10")
    torch.save(foreign_weights(network, DDPMUNet(network).state_dict(), "pesser"), path)


def timed(command, cwd):
    """(wall seconds, what it said on stdout and stderr) of a CLI command; stops the script when it fails."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "ddpm_main.py"), *command], cwd=cwd,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return seconds, result.stdout + result.stderr


def work_seconds(said, out):
    """The seconds of the work a command did, as it reports them: 'N samples in X s', or the bound's JSON."""
    match = re.search(r"\d+ samples in ([\d.]+) s", said)
    if match:
        return float(match.group(1))
    nll = os.path.join(out, "outputs", "nll_nll.json")
    if "bits/dim" in said and os.path.isfile(nll):
        with open(nll) as f:
            return json.load(f)["seconds"]
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="a CIFAR-10 image-folder tree (test/<class>/*.jpg)")
    parser.add_argument("--out", required=True, help="a working folder")
    parser.add_argument("--fast_images", type=int, default=100, help="images sampled with dpm++2m, 15 steps")
    parser.add_argument("--ancestral_images", type=int, default=10, help="images sampled with 1,000 ddpm steps")
    parser.add_argument("--nll_images", type=int, default=10, help="test images of --eval_nll")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    weights = os.path.join(args.out, "model-790000.ckpt")
    write_random_pesser_file(weights)
    model = os.path.join("models", "ho2020_random", "ckpt.pt")
    runs = [("import", ["--import_weights", weights, "--run_name", "ho2020_random"], 1),
            ("dpm++2m, 15 steps", ["--inference", "--model_path", model, "--sampler", "dpm++2m", "--sampling_steps",
                                   "15", "--num_samples", str(args.fast_images), "--run_name", "fast"],
             args.fast_images),
            ("ddpm, 1,000 steps, σ_t² = β_t", ["--inference", "--model_path", model, "--num_samples",
                                               str(args.ancestral_images), "--run_name", "ancestral"],
             args.ancestral_images),
            ("--eval_nll", ["--inference", "--model_path", model, "--eval_nll", str(args.nll_images), "--data_dir",
                            args.data_dir, "--run_name", "nll"], args.nll_images)]
    results = []
    for what, command, images in runs:
        seconds, said = timed(command, args.out)
        work_s = work_seconds(said, args.out)
        results.append({"what": what, "command": "python ddpm_main.py " + " ".join(command), "wall_s": seconds,
                        "images": images, "work_s": work_s, "s_per_image": None if work_s is None else work_s / images})
        per_image = "" if work_s is None else f", {work_s:.1f} s of work: {work_s / images:.2f} s an image"
        print(f"{what}: {seconds:.1f} s wall{per_image} ({images} images)", flush=True)
    with open(os.path.join(args.out, "paper_model_cost.json"), "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
