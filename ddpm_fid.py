"""FID (Heusel et al. 2017) as the standard implementation computes it: TF-Inception-v3 (2015-12-05) pool
features after TF1's bilinear resize to 299 × 299, and the Fréchet distance of two Gaussians fitted to them.
The reference is the training images' statistics, computed once and cached beside the data, or an npz; either must
describe the dataset the model was trained on. The cache records which network made it (a SHA-256 of the
--fid_inception file), from which images and of what data, and is made again when any of them differs. The network is
run on one image as it loads, and statistics are checked (finite, mu (2048,), sigma (2048, 2048) symmetric) before
they are cached or used. Grayscale images are repeated into Inception's three channels."""
import hashlib
import io
import lzma
import os
import sys
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_data import CIFAR10_CLASSES, data_facts, describe_data, load_dataset
from ddpm_helpers import UserError, WriteError, atomic_open

FID_STATS_NAME = "ddpm_fid_train_stats.npz"      # beside an image folder; a torchvision dataset's names it too
UNTAGGED_STATS = ("cifar10", 3, 32, 32)         # what an npz without a 'dataset' entry (the referee's) describes
FEATURES = 2048                                 # the pool features' width


def load_inception(path, device):
    """(the TF-Inception (2015-12-05) pool-feature TorchScript used by the standard FID, the SHA-256 of its file);
    `.xz` accepted. Input: float (N, 3, 299, 299) = (pixels − 128) / 128; output: (N, 2048)."""
    if not path or not os.path.isfile(path):
        raise UserError(f"--fid_inception {path!r} is not a file: FID needs the TF-Inception TorchScript "
                        "(inception-2015-12-05 pool features, as used by StyleGAN2-ADA / EDM), optionally .xz")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        source = io.BytesIO(lzma.decompress(raw) if path.endswith(".xz") else raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            net = torch.jit.load(source, map_location="cpu").float().eval().to(device)
    except Exception as e:
        raise UserError(f"--fid_inception {path!r} is not a loadable TorchScript network ({type(e).__name__})") from None
    return net, hashlib.sha256(raw).hexdigest()


def tf_resize_matrix(size_in, size_out):
    """(size_out, size_in) weights of TF1's resize_bilinear (align_corners=False, no half-pixel
    centres): output pixel j reads source position j · in / out, border pixels repeated."""
    src = torch.arange(size_out, dtype=torch.float64) * size_in / size_out
    lo = src.floor().long().clamp(max=size_in - 1)
    hi = (lo + 1).clamp(max=size_in - 1)
    frac = src - lo
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    weights[torch.arange(size_out), lo] += 1 - frac
    weights[torch.arange(size_out), hi] += frac
    return weights.float()


class FIDFeatures:
    """Inception pool features of uint8 images, resized like the standard (TF) FID implementation. The network is
    run on one image as it loads: a file that is not the feature network is a UserError before anything uses it."""

    def __init__(self, path, device):
        self.path, self.device = path, torch.device(device)
        self.net, self.fingerprint = load_inception(path, self.device)
        self.check()

    def check(self):
        """UserError unless the network turns one image into FEATURES finite features."""
        image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        try:
            features = self(image)
        except Exception as e:
            raise UserError(f"--fid_inception {self.path!r} fails on one 32×32 image ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}): it is not the "
                            "Inception pool-feature network") from None
        if tuple(features.shape) != (1, FEATURES):
            raise UserError(f"--fid_inception {self.path!r} gives features of shape {tuple(features.shape)} for one "
                            f"image, not (1, {FEATURES}): it is not the Inception pool-feature network")
        if not torch.isfinite(features).all():
            raise UserError(f"--fid_inception {self.path!r} gives NaN or infinite features for one image: the "
                            "network is broken")

    @torch.no_grad()
    def __call__(self, images_uint8):
        """images (N, H, W, C) or (N, C, H, W) uint8, C = 3 or 1 (grey, repeated into the three channels) →
        features (N, 2048) float64, in exact fp32 (no TF32)."""
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            return self._features(images_uint8)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

    def _features(self, images_uint8):
        x = torch.as_tensor(np.ascontiguousarray(images_uint8)).to(self.device)
        if x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)
        x = x.float().expand(-1, 3, -1, -1)                             # (N, 3, H, W) in [0, 255]: grey repeated
        rows = tf_resize_matrix(x.shape[2], 299).to(self.device)
        cols = tf_resize_matrix(x.shape[3], 299).to(self.device)
        x = torch.einsum("oh,nchw,pw->ncop", rows, x, cols)            # (N, 3, 299, 299)
        return self.net((x - 128) / 128).double()

    def statistics(self, images_uint8, batch_size=250, progress=False):
        """Mean (2048,) and covariance (2048, 2048) of the features, as float64 numpy arrays; UserError when they are
        not finite (the network gave NaN or infinity for some image)."""
        total = torch.zeros(FEATURES, dtype=torch.float64, device=self.device)
        outer = torch.zeros(FEATURES, FEATURES, dtype=torch.float64, device=self.device)
        n = len(images_uint8)
        for start in tqdm(range(0, n, batch_size), desc="FID features", disable=not progress, leave=False):
            f = self(images_uint8[start:start + batch_size])
            total += f.sum(0)
            outer += f.T @ f
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
        if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
            raise UserError(f"--fid_inception {self.path!r} gave NaN or infinite features for some of {n} images: the "
                            "network is broken; nothing was cached")
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)   (Heusel et al. 2017).

    tr (Σ1 Σ2)^½ is taken as Σ √λ of the symmetric Σ1^½ Σ2 Σ1^½, which has the same eigenvalues as
    Σ1 Σ2: the value of scipy.linalg.sqrtm's, about five times faster at 2048 × 2048.
    """
    w, v = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eigenvalues = np.linalg.eigvalsh(sqrt_sigma1 @ sigma2 @ sqrt_sigma1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def fid_identity(facts):
    """What FID statistics describe, from data facts (ddpm_data.data_facts): (dataset, channels, height, width).
    CIFAR-10 as an image folder (its class names, 32 × 32 colour) counts as cifar10."""
    h, w = facts["data_size"]
    cifar10 = facts["classes"] == CIFAR10_CLASSES and facts["channels"] == 3 and (h, w) == (32, 32)
    return "cifar10" if cifar10 else facts["dataset"], facts["channels"], h, w


def describe_identity(identity):
    name, channels, h, w = identity
    return f"{name} ({h}×{w} {'grayscale' if channels == 1 else 'colour'})"


def stats_identity(ref):
    """What an npz of statistics describes (fid_identity): its 'dataset' and 'shape' entries, written by this tool;
    without them (the referee's, clean-fid's), CIFAR-10."""
    return (str(ref["dataset"]), *map(int, ref["shape"])) if "dataset" in ref else UNTAGGED_STATS


def statistics_problem(entries):
    """What keeps an npz's entries from being FID statistics (None: nothing): mu (2048,) and sigma (2048, 2048),
    finite, sigma symmetric (to float32's precision)."""
    mu, sigma = entries.get("mu"), entries.get("sigma")
    if mu is None or sigma is None:
        return f"it holds no {'mu' if mu is None else 'sigma'}"
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        return (f"its mu is {mu.shape} and sigma {sigma.shape}, not ({FEATURES},) and ({FEATURES}, {FEATURES}) "
                "(Inception pool features)")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        return "its mu and sigma are not floating-point numbers"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return "its mu or sigma hold NaN or infinite values"
    if np.abs(sigma - sigma.T).max() > 1e-5 * max(np.abs(sigma).max(), 1e-30):
        return "its sigma is not symmetric, as a covariance is"
    return None


def read_statistics(path):
    """(the npz's entries as a dict, None), or (None, what is wrong) when it cannot be read or holds no statistics
    (statistics_problem). Pickled objects are never loaded."""
    try:
        with np.load(path) as npz:
            entries = {key: npz[key] for key in npz.files}
        stats_identity(entries)  # its dataset and shape entries, when it has them, must be readable
    except Exception as e:
        return None, f"it is not a readable npz of statistics ({type(e).__name__})"
    problem = statistics_problem(entries)
    return (None, problem) if problem else (entries, None)


def ref_statistics_file(stats_path, model_facts):
    """(mu, sigma) of --fid_ref_stats, checked: FID statistics (read_statistics) of the data the model was trained on
    (UserError otherwise)."""
    ref, problem = read_statistics(stats_path)
    if problem:
        raise UserError(f"--fid_ref_stats {stats_path!r} cannot be used: {problem}")
    identity, tagged = stats_identity(ref), "dataset" in ref
    if identity != fid_identity(model_facts):
        untagged = "" if tagged else (" (an npz without a 'dataset' entry, like the referee's, is taken to be "
                                      "CIFAR-10's)")
        raise UserError(f"--fid_ref_stats {stats_path!r} holds statistics of {describe_identity(identity)}{untagged}, "
                        f"but the model was trained on {describe_identity(fid_identity(model_facts))}: an FID against "
                        "another dataset measures nothing. Leave --fid_ref_stats out to use the training images' own")
    return ref["mu"].astype(np.float64), ref["sigma"].astype(np.float64)


def cached_statistics(cache_path, num_images, identity, fingerprint):
    """(mu, sigma) from the cache when it was made by the network with this fingerprint from num_images images of
    data `identity`; else (None, why it is made again)."""
    cached, problem = read_statistics(cache_path)
    if problem:
        return None, f"is damaged ({problem})"
    if "network" not in cached:
        return None, "does not record which network made it (an older version's)"
    if str(cached["network"]) != fingerprint:
        return None, "was made by another --fid_inception network"
    if "n" not in cached or int(cached["n"]) != num_images or stats_identity(cached) != identity:
        return None, "was made from other images"
    return (cached["mu"].astype(np.float64), cached["sigma"].astype(np.float64)), None


def reference_statistics(features, data_dir, dataset, model_facts, train_images_uint8=None, progress=False):
    """The reference (mu, sigma) for a model trained on data described by model_facts (data_facts) when no
    --fid_ref_stats are given (ref_statistics_file): those of the training images (N, C, H, W) uint8 — read from
    data_dir (a `dataset`, see ddpm_data.load_dataset) when None — cached in data_dir, keyed by the network, the image
    count and what they are. Training images of another dataset are a UserError."""
    if train_images_uint8 is None:
        data = load_dataset(data_dir, dataset)
        facts, train_images_uint8 = data_facts(data), data["train_images"]
        if fid_identity(facts) != fid_identity(model_facts) or facts["classes"] != model_facts["classes"]:
            raise UserError(f"--data_dir {data_dir!r} holds {describe_data(facts)}, but the model was trained on "
                            f"{describe_data(model_facts)}: FID compares with the training data; point --data_dir "
                            "at it")
    identity, dataset = fid_identity(model_facts), model_facts["dataset"]
    name = FID_STATS_NAME if dataset == "folder" else FID_STATS_NAME.replace(".npz", f"_{dataset}.npz")
    cache_path = os.path.join(data_dir, name) if os.path.isdir(data_dir) else None
    if cache_path and os.path.isfile(cache_path):
        cached, why = cached_statistics(cache_path, len(train_images_uint8), identity, features.fingerprint)
        if cached:
            return cached
        print(f"note: the FID reference statistics {cache_path} {why}: computing them again", file=sys.stderr)
    mu, sigma = features.statistics(train_images_uint8.permute(0, 2, 3, 1).numpy(), progress=progress)  # finite
    if cache_path:
        try:
            with atomic_open(cache_path) as f:
                np.savez(f, mu=mu, sigma=sigma.astype(np.float32), n=len(train_images_uint8), dataset=identity[0],
                         shape=np.array(identity[1:]), network=features.fingerprint)
        except WriteError:
            pass  # a read-only or full data folder: the statistics are recomputed next time
    return mu, sigma
