"""Where a second draw lands, for the bench scripts: the tool's FID interval (ddpm_fid.fid_second_draw) of an npz of
samples, from the tool's own Inception pass against the training statistics. Two FIDs whose difference is inside it
cannot be told apart: the scripts mark such differences as noise."""
import functools
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ddpm_fid import InceptionFeatures, fid_second_draw  # noqa: E402

WEIGHTS = os.path.join(ROOT, "..", "shared", "fid", "inception-2015-12-05-torch-fidelity-fp16w.pth")
REF_STATS = os.path.join(ROOT, "..", "shared", "fid", "cifar10-jpeg-train-stats.npz")


@functools.cache
def network(weights, device):
    return InceptionFeatures(weights, device)


def second_draw(images_uint8, weights=WEIGHTS, ref_stats=REF_STATS, device="cpu"):
    """± where the FID of a second draw of as many images lands, for images (N, H, W, C) uint8 or an npz holding
    them (its first array)."""
    if isinstance(images_uint8, str):
        with np.load(images_uint8) as npz:
            images_uint8 = npz[npz.files[0]]
    features, _ = network(weights, device).pool_features(images_uint8)
    with np.load(ref_stats) as stats:
        return fid_second_draw(features, stats["mu"], stats["sigma"])[0]


def noise_mark(difference, width):
    """' (noise)' when a difference of two FIDs is inside where a second draw lands (width None: unknown, '')."""
    return " (noise)" if width is not None and abs(difference) <= width else ""
