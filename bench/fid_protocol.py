"""The tool's FID and IS against the referee's FID of the same images, and the tool's seconds per 1,000 images.

    python bench/fid_protocol.py --weights ../shared/fid/inception-2015-12-05-torch-fidelity-fp16w.pth \
        --referee ../shared/tools/referee_fid.py --ref_stats ../shared/fid/cifar10-jpeg-train-stats.npz \
        --samples outputs/fid_samples_shipped_fid1k.npz --test_images /tmp/cifar10 --results bench/fid_protocol.json

Each set of images (--samples: npz files of uint8 images, e.g. the fid_samples_<run>.npz that --eval_fid writes;
--test_images DIR: the first --num_test of a fixed random permutation (seed 0) of the test split there) is read twice
against the --ref_stats statistics: by the tool (ddpm_fid: torch-fidelity's network from --weights, FID and IS of
one pass) and by the referee (its own TorchScript and code, in a new process, as every benchmark reads FID). One
row per set, printed and written to --results as it finishes: n, both FIDs, their relative difference, IS (None
when the weights have no classifier layer) and the seconds of each reader.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ddpm_data import load_dataset  # noqa: E402
from ddpm_fid import (InceptionFeatures, frechet_distance, inception_score, read_checked_npz,  # noqa: E402
                      statistics_problem)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="the tool's Inception weights (--fid_inception; default: fetched)")
    p.add_argument("--referee", required=True, help="referee_fid.py")
    p.add_argument("--ref_stats", required=True, help="reference statistics npz (mu, sigma) for both readers")
    p.add_argument("--samples", nargs="*", default=[], help="npz files of uint8 images (N, H, W, 3)")
    p.add_argument("--test_images", help="an image-folder CIFAR-10 (train/, test/): read --num_test of its test split")
    p.add_argument("--num_test", type=int, default=1000)
    p.add_argument("--results", default="bench/fid_protocol.json")
    p.add_argument("--work", default=tempfile.gettempdir(), help="where the test images' npz is written")
    return p.parse_args()


def image_sets(a):
    """{name: npz path} of the sets to read: each --samples file, and the chosen test images written as an npz."""
    sets = {os.path.basename(path): path for path in a.samples}
    if a.test_images:
        test = load_dataset(a.test_images)["test_images"]                           # (N, 3, 32, 32) uint8
        chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:a.num_test]
        path = os.path.join(a.work, f"test{a.num_test}.npz")
        np.savez(path, images=test[chosen].permute(0, 2, 3, 1).numpy())
        sets[f"{a.num_test} test images (randperm seed 0)"] = path
    return sets


def tool_reading(features, reference, images):
    """(FID, IS or None, seconds) of the images by the tool."""
    start = time.perf_counter()
    mu, sigma, logits = features.statistics(images, keep_logits=True)
    fid = frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    score = inception_score(logits)[0] if features.has_classifier else None
    return fid, score, time.perf_counter() - start


def referee_reading(a, path):
    """(FID, seconds) of the npz at path by the referee, in its own process: its last line, 'FID <v> (n=<N>)'."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, a.referee, path, "--ref", a.ref_stats, "--device", "cpu"],
                         capture_output=True, text=True, check=True).stdout
    return float(re.findall(r"^FID ([\d.]+) \(n=\d+\)$", out, re.M)[-1]), time.perf_counter() - start


def main():
    a = parse_args()
    reference, problem = read_checked_npz(a.ref_stats, statistics_problem)
    if problem:
        sys.exit(f"--ref_stats {a.ref_stats}: {problem}")
    features = InceptionFeatures(a.weights, "cpu", verbose=True)
    rows = []
    for name, path in image_sets(a).items():
        images = np.load(path)["images"]
        fid, score, tool_s = tool_reading(features, reference, images)
        referee_fid, referee_s = referee_reading(a, path)
        rows.append({"images": name, "n": len(images), "tool_fid": fid, "referee_fid": referee_fid,
                     "relative_difference": abs(fid - referee_fid) / referee_fid, "tool_is": score,
                     "tool_s": tool_s, "tool_s_per_1000": 1000 * tool_s / len(images), "referee_s": referee_s})
        print(f"{name}: n = {len(images)}, tool FID {fid:.4f}, referee FID {referee_fid:.4f} (difference "
              f"{100 * rows[-1]['relative_difference']:.4f} %), IS {score}, tool {tool_s:.0f} s "
              f"({rows[-1]['tool_s_per_1000']:.0f} s per 1,000), referee {referee_s:.0f} s", flush=True)
        with open(a.results, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                       "command": " ".join(["python"] + sys.argv), "network_sha256": features.fingerprint,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
