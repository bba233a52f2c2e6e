"""FID (Heusel et al. 2017) as the standard implementation computes it: TF-Inception-v3 (2015-12-05) pool
features after TF1's bilinear resize to 299 × 299, and the Fréchet distance of two Gaussians fitted to them.
The reference is the training images' statistics, computed once and cached beside the data, or an npz."""
import io
import lzma
import os
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_data import load_dataset
from ddpm_helpers import UserError

FID_STATS_NAME = "ddpm_fid_train_stats.npz"


def load_inception(path, device):
    """The TF-Inception (2015-12-05) pool-feature TorchScript used by the standard FID; `.xz` accepted.
    Input: float (N, 3, 299, 299) = (pixels − 128) / 128; output: (N, 2048)."""
    if not path or not os.path.isfile(path):
        raise UserError(f"--fid_inception {path!r} is not a file: FID needs the TF-Inception TorchScript "
                        "(inception-2015-12-05 pool features, as used by StyleGAN2-ADA / EDM), optionally .xz")
    try:
        if path.endswith(".xz"):
            with lzma.open(path) as f:
                source = io.BytesIO(f.read())
        else:
            source = path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            return torch.jit.load(source, map_location="cpu").float().eval().to(device)
    except Exception as e:
        raise UserError(f"--fid_inception {path!r} is not a loadable TorchScript network ({type(e).__name__})") from None


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
    """Inception pool features of uint8 images, resized like the standard (TF) FID implementation."""

    def __init__(self, path, device):
        self.device = torch.device(device)
        self.net = load_inception(path, self.device)

    @torch.no_grad()
    def __call__(self, images_uint8):
        """images (N, H, W, 3) or (N, 3, H, W) uint8 → features (N, 2048) float64, in exact fp32 (no TF32)."""
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            return self._features(images_uint8)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

    def _features(self, images_uint8):
        x = torch.as_tensor(np.ascontiguousarray(images_uint8)).to(self.device)
        if x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        x = x.float()                                                   # (N, 3, H, W) in [0, 255]
        rows = tf_resize_matrix(x.shape[2], 299).to(self.device)
        cols = tf_resize_matrix(x.shape[3], 299).to(self.device)
        x = torch.einsum("oh,nchw,pw->ncop", rows, x, cols)            # (N, 3, 299, 299)
        return self.net((x - 128) / 128).double()

    def statistics(self, images_uint8, batch_size=250, progress=False):
        """Mean (2048,) and covariance (2048, 2048) of the features, as float64 numpy arrays."""
        total = torch.zeros(2048, dtype=torch.float64, device=self.device)
        outer = torch.zeros(2048, 2048, dtype=torch.float64, device=self.device)
        n = len(images_uint8)
        for start in tqdm(range(0, n, batch_size), desc="FID features", disable=not progress, leave=False):
            f = self(images_uint8[start:start + batch_size])
            total += f.sum(0)
            outer += f.T @ f
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
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


def reference_statistics(features, data_dir, train_images_uint8=None, stats_path=None, progress=False):
    """The reference (mu, sigma): from stats_path (an npz with mu and sigma) when given, else from the training
    images (N, 3, H, W) uint8 — read from data_dir when None — cached in data_dir/FID_STATS_NAME, keyed by
    the image count."""
    if stats_path:
        ref = np.load(stats_path)
        return ref["mu"], ref["sigma"].astype(np.float64)
    if train_images_uint8 is None:
        train_images_uint8 = load_dataset(data_dir)["train_images"]
    cache_path = os.path.join(data_dir, FID_STATS_NAME) if os.path.isdir(data_dir) else None
    if cache_path and os.path.isfile(cache_path):
        cached = np.load(cache_path)
        if int(cached["n"]) == len(train_images_uint8):
            return cached["mu"], cached["sigma"].astype(np.float64)
    mu, sigma = features.statistics(train_images_uint8.permute(0, 2, 3, 1).numpy(), progress=progress)
    if cache_path:
        tmp = f"{cache_path}.tmp{os.getpid()}.npz"
        try:
            np.savez(tmp, mu=mu, sigma=sigma.astype(np.float32), n=len(train_images_uint8))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only data folder: the statistics are recomputed next time
    return mu, sigma
