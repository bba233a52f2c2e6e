"""FID (Heusel et al. 2017) and the Inception Score (Salimans et al. 2016) as the standard implementations compute
them, through torch-fidelity: its exact port of the TF Inception-v3 (2015-12-05) and of TF1's bilinear resize to
299 × 299; FID from the 2048 pool features, IS from the classifier's 1008 logits (without its bias, as the TF graph
has them), both from one pass over the images. The weights are torch-fidelity's file, fetched on first use and checked
by SHA-256 (ddpm_download), or a local copy (--fid_inception), which is read with weights_only=True before
torch-fidelity (which unpickles with weights_only=False) is given it: a file that would run code is refused.

The reference is the statistics of the training images (--fid_ref test: the test images), computed once and cached
beside the data, or an npz; either must describe the dataset the model was trained on. The cache records which
network made it (the SHA-256 of the weights file), from which images and of what data, and is made again when any of
them differs. The network is run on one image as it loads, and statistics are checked (finite, mu (2048,), sigma
(2048, 2048) symmetric) before they are cached or used. Grayscale images are repeated into Inception's three
channels."""
import functools
import hashlib
import importlib.metadata
import io
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_data import CIFAR10_CLASSES, data_facts, describe_data, load_dataset
from ddpm_download import RemoteFile, fetched
from ddpm_helpers import UserError, WriteError, atomic_open, stderr_is_terminal

# torch-fidelity's weights file (the file name carries the first 8 hex digits of its SHA-256, torch.hub's convention);
# its address is torch-fidelity's URL_INCEPTION_V3 (a test checks), written here so that torch-fidelity, a second of
# imports, loads only when FID runs
INCEPTION = RemoteFile("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                       "weights-inception-2015-12-05-6726825d.pth",
                       "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
                       95_628_359, "the Inception-v3 weights of FID and IS", "--fid_inception")
INCEPTION_NAME = "inception-v3-compat"          # torch-fidelity's name for this network
FEATURES = 2048                                 # the pool features' width
IS_SPLITS = 10                                  # the Inception Score's splits (Salimans et al., Ho et al.)
# images per Inception batch: a GPU wants many; on a 2-core CPU 16 read 13.6 images/s and 250 read 10.6 (BENCHMARKS.md)
FEATURE_BATCH = {"cuda": 250, "cpu": 16}
REFERENCE_SPLITS = ("train", "test")            # --fid_ref
UNTAGGED_STATS = ("cifar10", 3, 32, 32)         # what an npz without a 'dataset' entry (the referee's) describes


def torch_fidelity_version():
    """torch-fidelity's version: part of the FID protocol, its implementation reads the figures."""
    return importlib.metadata.version("torch-fidelity")


def stats_cache_name(split, dataset):
    """The reference statistics' cache beside the data: ddpm_fid_<split>_stats[_<dataset>].npz."""
    return f"ddpm_fid_{split}_stats{'' if dataset == 'folder' else f'_{dataset}'}.npz"


def weights_problem(raw):
    """What keeps a --fid_inception file's bytes from being weights torch-fidelity may be given (None: nothing): they
    must load with torch.load(weights_only=True), which runs no code, as a dict of tensors."""
    if raw.startswith(b"\xfd7zXZ"):
        return ("is xz-compressed, as the TorchScript network older versions of this tool read was; FID now runs on "
                "torch-fidelity's weights file")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                return ("is a TorchScript network (what older versions of this tool read); FID now runs on "
                        "torch-fidelity's weights file")
    except zipfile.BadZipFile:
        pass  # torch.save's legacy format is no zip; torch.load says whether it reads
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        return (f"cannot be read as plain weights ({type(e).__name__}): it is damaged, or it holds objects that "
                "would run code as they load, which this tool never does")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "holds no state dict (a dict of tensors)"
    return None


def load_inception(path, device, verbose=False, progress=False):
    """(torch-fidelity's Inception-v3 with the weights at path on device, the file's SHA-256); path None: the official
    file, fetched on first use. UserError for other files; a note (verbose) when not the official one."""
    if path is None:
        path = fetched(INCEPTION, progress, verbose)
    elif not os.path.isfile(path):
        raise UserError(f"--fid_inception {path!r} is not a file: leave the flag out to fetch {INCEPTION.file_name}, "
                        "or give torch-fidelity's Inception weights file")
    with open(path, "rb") as f:
        raw = f.read()
    problem = weights_problem(raw)
    if problem:
        raise UserError(f"--fid_inception {path!r} {problem}: give torch-fidelity's Inception weights file "
                        f"({INCEPTION.file_name}), or leave the flag out to fetch it")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    try:
        with torch.random.fork_rng(devices=[]):  # its random initialisation, replaced by the weights, leaves the
            net = FeatureExtractorInceptionV3(   # caller's random numbers (a seeded sampler's) as they were
                INCEPTION_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=path)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise UserError(f"--fid_inception {path!r} does not hold the Inception-v3 weights torch-fidelity expects "
                        f"({type(e).__name__}: {first_line})") from None
    sha256 = hashlib.sha256(raw).hexdigest()
    if sha256 != INCEPTION.digest and verbose:
        print(f"note: --fid_inception {path!r} is not the official {INCEPTION.file_name} (SHA-256 {sha256[:12]}…, "
              f"official {INCEPTION.digest[:12]}…): its FID and IS compare only with figures read with this same "
              "file", file=sys.stderr)
    return net.to(device, memory_format=torch.channels_last), sha256  # a third faster on a CPU (BENCHMARKS.md)


def random_inception(seed=0):
    """torch-fidelity's Inception-v3 with random weights: the stand-in of tests and smoke runs."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keeps the random initialisation
            return None

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(seed)
        empty = os.path.join(folder, "empty.pth")
        torch.save({}, empty)
        net = Unloaded(INCEPTION_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=empty)
        for module in net.modules():  # He et al.'s initialisation keeps the features' scale through 94 ReLU layers
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net


def write_random_inception(path, seed=0):
    """random_inception's weights as a file of the real one's format; returns path."""
    torch.save(random_inception(seed).state_dict(), path)
    return path


def inception_score(logits, splits=IS_SPLITS):
    """(mean, standard deviation) over `splits` consecutive parts of the images of exp E_x KL(p(y|x) ‖ p(y)),
    p(y) the part's mean of p(y|x) (Salimans et al. 2016, §4), from logits (N, 1008); torch-fidelity's
    implementation, the parts in the images' order as in Salimans et al.'s code (no shuffle)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    if len(logits) < splits:
        raise ValueError(f"the Inception Score's {splits} splits need at least {splits} images, got {len(logits)}")
    score = isc_features_to_metric(torch.as_tensor(logits), splits, shuffle=False)
    return score[KEY_METRIC_ISC_MEAN], score[KEY_METRIC_ISC_STD]


class InceptionFeatures:
    """Inception pool features and logits of uint8 images, resized as the TF implementations do; tried on one image
    as it loads. has_classifier: whether its logits are finite (without, FID but no IS)."""

    def __init__(self, path, device, verbose=False):
        self.path, self.device = path or INCEPTION.file_name, torch.device(device)
        self.net, self.fingerprint = load_inception(path, self.device, verbose, verbose and stderr_is_terminal())
        self.official = self.fingerprint == INCEPTION.digest
        self.has_classifier = bool(torch.isfinite(self.net.fc.weight).all())
        self.check()

    def check(self):
        """UserError unless the network turns one image into FEATURES finite features."""
        image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        features, _ = self(image)
        if not torch.isfinite(features).all():
            raise UserError(f"--fid_inception {self.path!r} gives NaN or infinite features for one image: the "
                            "network is broken")

    @functools.cached_property
    def seconds_per_image(self, count=4):
        """Seconds per image of one batch of `count` (after check's first call): what a time budget counts."""
        images = np.zeros((count, 32, 32, 3), dtype=np.uint8)
        start = time.perf_counter()
        self(images)[0].cpu()  # on the CPU: the device has finished
        return (time.perf_counter() - start) / count

    @torch.no_grad()
    def __call__(self, images_uint8):
        """images (N, H, W, C) or (N, C, H, W) uint8, C = 3 or 1 (grey, repeated into the three channels) →
        (pool features (N, 2048), logits (N, 1008)), float64, in exact fp32 (no TF32)."""
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            x = torch.as_tensor(np.ascontiguousarray(images_uint8))
            if x.shape[-1] in (1, 3):
                x = x.permute(0, 3, 1, 2)
            x = x.expand(-1, 3, -1, -1).to(self.device)                 # (N, 3, H, W) uint8: grey repeated
            features, logits = self.net(x)                              # resized to 299 × 299 inside
            return features.double(), logits.double()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

    def statistics(self, images_uint8, batch_size=None, progress=False, keep_logits=False):
        """(mean (2048,), covariance (2048, 2048), logits (N, 1008) when keep_logits) as float64 numpy arrays;
        UserError when they are not finite."""
        batch_size = batch_size or FEATURE_BATCH.get(self.device.type, FEATURE_BATCH["cpu"])
        total = torch.zeros(FEATURES, dtype=torch.float64, device=self.device)
        outer = torch.zeros(FEATURES, FEATURES, dtype=torch.float64, device=self.device)
        logits = []
        n = len(images_uint8)
        for start in tqdm(range(0, n, batch_size), desc="Inception features", disable=not progress, leave=False):
            f, batch_logits = self(images_uint8[start:start + batch_size])
            total += f.sum(0)
            outer += f.T @ f
            if keep_logits:
                logits.append(batch_logits.cpu())
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
        if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
            raise UserError(f"--fid_inception {self.path!r} gave NaN or infinite features for some of {n} images: the "
                            "network is broken; nothing was cached")
        return mu.cpu().numpy(), sigma.cpu().numpy(), torch.cat(logits).numpy() if keep_logits else None


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)   (Heusel et al. 2017), by torch-fidelity (tr (Σ1 Σ2)^½ as the sum of
    the square roots of Σ1 Σ2's eigenvalues)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    statistics = [{"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
                  for mu, sigma in ((mu1, sigma1), (mu2, sigma2))]
    return fid_statistics_to_metric(*statistics, verbose=False)[KEY_METRIC_FID]


def fid_identity(facts):
    """What FID statistics describe: (dataset, channels, height, width); CIFAR-10 as an image folder is cifar10."""
    h, w = facts["data_size"]
    cifar10 = facts["classes"] == CIFAR10_CLASSES and facts["channels"] == 3 and (h, w) == (32, 32)
    return "cifar10" if cifar10 else facts["dataset"], facts["channels"], h, w


def describe_identity(identity):
    name, channels, h, w = identity
    return f"{name} ({h}×{w} {'grayscale' if channels == 1 else 'colour'})"


def stats_identity(ref):
    """What an npz of statistics describes: its 'dataset' and 'shape' entries, else (the referee's) CIFAR-10."""
    return (str(ref["dataset"]), *map(int, ref["shape"])) if "dataset" in ref else UNTAGGED_STATS


MAX_FEATURE = 1e3  # far past any Inception pool feature's mean (the ImageNet-trained network's are below 10)


def statistics_problem(entries):
    """What keeps an npz's entries from being FID statistics (None: nothing): mu (2048,), sigma (2048, 2048), finite,
    sigma symmetric."""
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
    if np.abs(mu).max() > MAX_FEATURE or np.abs(sigma).max() > MAX_FEATURE ** 2:
        return (f"its mu or sigma hold values past {MAX_FEATURE:g} (mu) or {MAX_FEATURE ** 2:g} (sigma), which no "
                "Inception network gives (its pool features are means of ReLU outputs, a few units)")
    if np.abs(sigma - sigma.T).max() > 1e-5 * max(np.abs(sigma).max(), 1e-30):
        return "its sigma is not symmetric, as a covariance is"
    if np.diag(sigma).min() < -1e-6:
        return "its sigma has a negative variance on its diagonal, as a covariance has not"
    return None


def read_statistics(path):
    """(the npz's entries, None), or (None, what is wrong); pickled objects are never loaded."""
    try:
        with np.load(path) as npz:
            entries = {key: npz[key] for key in npz.files}
        stats_identity(entries)  # its dataset and shape entries, when it has them, must be readable
    except Exception as e:
        return None, f"it is not a readable npz of statistics ({type(e).__name__})"
    problem = statistics_problem(entries)
    return (None, problem) if problem else (entries, None)


@dataclass(frozen=True)
class Reference:
    """The statistics FID compares samples with, and where they come from (for the printed line and the JSON)."""
    mu: np.ndarray        # (2048,) float64
    sigma: np.ndarray     # (2048, 2048) float64
    source: str           # e.g. "the train split at data/cifar10" or "--fid_ref_stats stats.npz"
    images: int = None    # how many images they describe (None: a file that does not say)


def ref_statistics_file(stats_path, model_facts):
    """The Reference of --fid_ref_stats: FID statistics of the data the model was trained on (UserError otherwise)."""
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
    return Reference(ref["mu"].astype(np.float64), ref["sigma"].astype(np.float64), f"--fid_ref_stats {stats_path}",
                     int(ref["n"]) if "n" in ref else None)


def cached_statistics(cache_path, num_images, identity, fingerprint):
    """(mu, sigma) from the cache when this network made it from these images; else (None, why it is made again)."""
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


def reference_statistics(features, data_dir, dataset, model_facts, split="train", images_uint8=None, progress=False):
    """The Reference without --fid_ref_stats: the statistics of the `split` images (N, C, H, W) uint8 (None: read from
    data_dir), cached beside the data keyed by the network, the image count and the data. Other data: UserError."""
    if images_uint8 is None:
        data = load_dataset(data_dir, dataset)
        facts, images_uint8 = data_facts(data), data[f"{split}_images"]
        if fid_identity(facts) != fid_identity(model_facts) or facts["classes"] != model_facts["classes"]:
            raise UserError(f"--data_dir {data_dir!r} holds {describe_data(facts)}, but the model was trained on "
                            f"{describe_data(model_facts)}: FID compares with the training data; point --data_dir "
                            "at it")
    identity, source = fid_identity(model_facts), f"the {split} split at {data_dir}"
    cache_path = (os.path.join(data_dir, stats_cache_name(split, model_facts["dataset"])) if os.path.isdir(data_dir)
                  else None)
    if cache_path and os.path.isfile(cache_path):
        cached, why = cached_statistics(cache_path, len(images_uint8), identity, features.fingerprint)
        if cached:
            return Reference(*cached, source, len(images_uint8))
        print(f"note: the FID reference statistics {cache_path} {why}: computing them again", file=sys.stderr)
    mu, sigma, _ = features.statistics(images_uint8.permute(0, 2, 3, 1).numpy(), progress=progress)  # finite
    if cache_path:
        try:
            with atomic_open(cache_path) as f:
                np.savez(f, mu=mu, sigma=sigma.astype(np.float32), n=len(images_uint8), dataset=identity[0],
                         shape=np.array(identity[1:]), network=features.fingerprint)
        except WriteError:
            pass  # a read-only or full data folder: the statistics are recomputed next time
    return Reference(mu, sigma, source, len(images_uint8))
