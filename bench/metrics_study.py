"""The Inception metrics on real images and on a model's samples (BENCHMARKS.md, "Metrics a CPU user can trust"):
1. the floor: 1,000 real test images (none of the copy check's held-out ones) read as if they were samples, against
   the training split: FID ± where a second draw lands, KID, precision/recall and the copy shares;
2. the interval against real second draws: FID of disjoint sets of 1,000 test images, their spread beside the
   half-samples', and how often one set's reading lands inside another's interval;
3. an injected copy: the samples of --samples (the npz --eval_fid wrote), one replaced by a training image: where
   the copy check ranks it.
It reads the reference caches an --eval_fid run left beside --data_dir (and makes them if absent).

    python -u bench/metrics_study.py --data_dir /tmp/cifar10 \\
        --weights ../shared/fid/inception-2015-12-05-torch-fidelity-fp16w.pth \\
        --ref_stats ../shared/fid/cifar10-jpeg-train-stats.npz --samples outputs/fid_samples_<run>.npz \\
        --results bench/metrics_study.json
"""
import argparse
import itertools
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_data import data_facts, evenly_spread, load_dataset  # noqa: E402
from ddpm_fid import (InceptionFeatures, Reference, SECOND_DRAW_Z, fid_second_draw, frechet_distance,  # noqa: E402
                      moments, sample_metrics, split_reference)
from ddpm_memorisation import HELD_OUT_IMAGES, copy_check, training_set  # noqa: E402

SET_SIZE = 1000


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True, help="the image folders of the model's data (train/, test/)")
    p.add_argument("--weights", required=True, help="torch-fidelity's Inception weights file")
    p.add_argument("--ref_stats", required=True, help="the training split's FID statistics (mu, sigma) npz")
    p.add_argument("--samples", required=True, help="an npz of uint8 samples (N, H, W, C), as --eval_fid writes")
    p.add_argument("--sets", type=int, default=9, help="disjoint sets of 1,000 test images for the spread")
    p.add_argument("--results", required=True, help="where the figures go (JSON)")
    return p


def timed(what, function, *args):
    start = time.perf_counter()
    value = function(*args)
    print(f"{what}: {time.perf_counter() - start:.1f} s", flush=True)
    return value


def main():
    a = build_parser().parse_args()
    net = InceptionFeatures(a.weights, "cpu")
    data = load_dataset(a.data_dir)
    facts = data_facts(data)
    _, _, train_features = timed("train features", split_reference, net, data["train_images"], "train", a.data_dir,
                                 facts)
    _, _, test_features = timed("test features", split_reference, net, data["test_images"], "test", a.data_dir, facts)
    with np.load(a.ref_stats) as stats:
        reference = Reference(stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64), a.ref_stats, None,
                              train_features, f"the train split at {a.data_dir}")
    training = timed("the copy check's bars", training_set, data["train_images"], train_features,
                     data["test_images"], test_features)
    held_out = set(evenly_spread(torch.arange(len(test_features)), HELD_OUT_IMAGES).tolist())
    others = [i for i in torch.randperm(len(test_features), generator=torch.Generator().manual_seed(0)).tolist()
              if i not in held_out]
    results = {"bars": {"features": training.feature_bar, "pixels": training.pixel_bar}}

    floor = others[:SET_SIZE]                                                   # 1. the floor
    results["floor"] = {**timed("floor metrics", sample_metrics, test_features[floor], reference),
                        **copy_check(data["test_images"][floor], test_features[floor], training)[0]}
    print("floor (1,000 real test images):", json.dumps(results["floor"]), flush=True)

    readings, widths = [], []                                                   # 2. real second draws
    for k in range(a.sets):
        rows = test_features[others[k * SET_SIZE:(k + 1) * SET_SIZE]]
        readings.append(frechet_distance(*moments(rows), reference.mu, reference.sigma))
        widths.append(fid_second_draw(rows, reference.mu, reference.sigma)[0])
        print(f"set {k}: FID {readings[-1]:.3f} ± {widths[-1]:.3f}", flush=True)
    pairs = list(itertools.permutations(range(a.sets), 2))
    results["second_draws"] = {
        "fids": readings, "widths": widths, "fid_std": float(np.std(readings, ddof=1)),
        "half_sample_std": float(np.mean(widths) / SECOND_DRAW_Z),
        "inside": sum(abs(readings[j] - readings[i]) <= widths[i] for i, j in pairs) / len(pairs)}
    print("second draws:", json.dumps(results["second_draws"]), flush=True)

    samples = torch.from_numpy(np.load(a.samples)["images"]).permute(0, 3, 1, 2).contiguous()  # 3. a copy
    sample_features, _ = timed("sample features", net.pool_features, samples.permute(0, 2, 3, 1).numpy())
    results["samples"] = {**sample_metrics(sample_features, reference), **copy_check(samples, sample_features,
                                                                                     training)[0]}
    print("samples:", json.dumps(results["samples"]), flush=True)
    before, _ = copy_check(samples, sample_features, training)
    copied = int(torch.randint(len(data["train_images"]), (1,), generator=torch.Generator().manual_seed(1)))
    samples[0] = data["train_images"][copied]
    sample_features[0] = net.pool_features(samples[:1].permute(0, 2, 3, 1).numpy())[0][0]
    after, (order, by_features, by_pixels, feature_d, pixel_d) = copy_check(samples, sample_features, training)
    results["injected_copy"] = {
        "training_image": copied, "share_before": before["copy_share"], "share_after": after["copy_share"],
        "share_pixels_before": before["copy_share_pixels"], "share_pixels_after": after["copy_share_pixels"],
        "rank": order.tolist().index(0) if 0 in order.tolist() else None,
        "found_by_features": int(by_features[0, 0]) == copied, "found_by_pixels": int(by_pixels[0, 0]) == copied,
        "distance": float(feature_d[0]), "distance_pixels": float(pixel_d[0])}
    print("injected copy:", json.dumps(results["injected_copy"]), flush=True)
    with open(a.results, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
