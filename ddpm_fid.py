"""The Inception metrics as the standard implementations compute them, through torch-fidelity: its exact port of the
TF Inception-v3 (2015-12-05) and of TF1's bilinear resize to 299 × 299; from the 2048 pool features FID (Heusel et
al. 2017) with the interval a second draw lands in (half-sampling), KID (Bińkowski et al. 2018) and precision/recall
(Kynkäänniemi et al. 2019); IS (Salimans et al. 2016) from the classifier's 1008 logits (without its bias, as the TF
graph has them); all from one pass over the images. The weights are torch-fidelity's file, fetched on first use and
checked by SHA-256 (ddpm_download), or a local copy (--fid_inception), which is read with weights_only=True before
torch-fidelity (which unpickles with weights_only=False) is given it: a file that would run code is refused.

The reference is the statistics and the pool features of the training images (--fid_ref test: the test images),
computed in one pass and cached beside the data (the features in half precision), or an npz of statistics; either
must describe the dataset the model was trained on. Each cache records which network made it (the SHA-256 of the
weights file), from which images and of what data, and is made again when any of them differs. The network is run on
one image as it loads, and statistics are checked (finite, mu (2048,), sigma (2048, 2048) symmetric) before they are
cached or used. Grayscale images are repeated into Inception's three channels."""
import functools
import hashlib
import importlib.metadata
import io
import math
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_data import CIFAR10_CLASSES, data_facts, describe_data, evenly_spread, load_dataset
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
KID_SUBSETS = 100                               # KID's subsets (torch-fidelity's default, as Bińkowski et al.)
PRC_NEIGHBOURHOOD = 3                           # the k of precision/recall's k-NN balls (Kynkäänniemi et al. 2019)
HALF_SAMPLES = 100                           # half-samples of the sample features for FID's interval
SECOND_DRAW_Z = 1.96 * math.sqrt(2)             # 95 % of the difference of two independent readings, in their std
CACHED_FEATURES = np.float16                    # the reference features' cache: 4 KB an image (205 MB for 50,000)
LONG_PASS_S = 60                                # a reference pass longer than this says so before it starts
UNTAGGED_STATS = ("cifar10", 3, 32, 32)         # what an npz without a 'dataset' entry (the referee's) describes


def torch_fidelity_version():
    """torch-fidelity's version: part of the FID protocol, its implementation reads the figures."""
    return importlib.metadata.version("torch-fidelity")


def stats_cache_name(split, dataset, kind="stats"):
    """A reference cache beside the data: ddpm_fid_<split>_<kind>[_<dataset>].npz, kind 'stats' or 'features'."""
    return f"ddpm_fid_{split}_{kind}{'' if dataset == 'folder' else f'_{dataset}'}.npz"


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

    def pool_features(self, images_uint8, batch_size=None, progress=False, keep_logits=False):
        """(pool features (N, 2048) float32 on the CPU, logits (N, 1008) float64 numpy when keep_logits); UserError
        when they are not finite."""
        batch_size = batch_size or FEATURE_BATCH.get(self.device.type, FEATURE_BATCH["cpu"])
        features, logits, n = torch.empty(len(images_uint8), FEATURES), [], len(images_uint8)
        for start in tqdm(range(0, n, batch_size), desc="Inception features", disable=not progress, leave=False):
            f, batch_logits = self(images_uint8[start:start + batch_size])
            features[start:start + len(f)] = f.float().cpu()     # the network's float32, exactly
            if keep_logits:
                logits.append(batch_logits.cpu())
        if not torch.isfinite(features).all():
            raise UserError(f"--fid_inception {self.path!r} gave NaN or infinite features for some of {n} images: the "
                            "network is broken; nothing was cached")
        return features, torch.cat(logits).numpy() if keep_logits else None

    def statistics(self, images_uint8, batch_size=None, progress=False, keep_logits=False):
        """(mean (2048,), covariance (2048, 2048), logits (N, 1008) when keep_logits) as float64 numpy arrays."""
        features, logits = self.pool_features(images_uint8, batch_size, progress, keep_logits)
        return (*moments(features), logits)


def moments(features, chunk=4096):
    """(mean, covariance) float64 numpy of features (N, 2048), summed in float64 a chunk at a time."""
    total = torch.zeros(features.shape[1], dtype=torch.float64)
    outer = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    for part in features.split(chunk):
        part = part.double()
        total += part.sum(0)
        outer += part.T @ part
    n = len(features)
    mu = total / n
    return mu.numpy(), ((outer - n * torch.outer(mu, mu)) / (n - 1)).numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)   (Heusel et al. 2017), by torch-fidelity (tr (Σ1 Σ2)^½ as the sum of
    the square roots of Σ1 Σ2's eigenvalues)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    statistics = [{"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
                  for mu, sigma in ((mu1, sigma1), (mu2, sigma2))]
    return fid_statistics_to_metric(*statistics, verbose=False)[KEY_METRIC_FID]


def fid_second_draw(sample_features, ref_mu, ref_sigma, draws=HALF_SAMPLES, seed=0):
    """How far the FID of a second draw of as many samples could land from this one: ± SECOND_DRAW_Z × the standard
    deviation of FID over `draws` half-samples (half the rows, drawn without replacement), whose spread is the
    spread of FID over draws of N (for a mean exactly: Var(half | data) = σ²(2/N − 1/N)); resampling N rows with
    replacement read 3 × the real spread (BENCHMARKS.md). Returns (the half-width, the readings)."""
    f = torch.as_tensor(sample_features, dtype=torch.float64)                       # (N, 2048)
    values, vectors = torch.linalg.eigh(torch.as_tensor(ref_sigma, dtype=torch.float64))
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T                       # Σ_r^½ (2048, 2048)
    projected, ref_mu = f @ root, torch.as_tensor(ref_mu, dtype=torch.float64)     # (N, 2048): f Σ_r^½
    ref_trace, generator = float(values.clamp(min=0).sum()), torch.Generator().manual_seed(seed)
    half = torch.zeros(len(f), dtype=torch.float64)
    half[:len(f) // 2] = 1
    readings = torch.tensor([fid_of_rows(f, projected, ref_mu, ref_trace,
                                         half[torch.randperm(len(f), generator=generator)]) for _ in range(draws)])
    return SECOND_DRAW_Z * float(readings.std()), readings


def fid_of_rows(f, projected, ref_mu, ref_trace, counts=None):
    """FID of features f (N, d), row i taken counts[i] times (None: once each), against the reference: tr (Σ Σ_r)^½
    as the sum of the singular values of A = √counts (f Σ_r^½ − mean) / √(n − 1) over the rows drawn, whose squares
    are the eigenvalues of Σ Σ_r (an m × m eigenproblem for m rows drawn, when fewer than d)."""
    counts = torch.ones(len(f), dtype=f.dtype) if counts is None else counts
    drawn = counts > 0
    f, projected, counts = f[drawn], projected[drawn], counts[drawn]
    n = counts.sum()
    mu = counts @ f / n
    a = (projected - counts @ projected / n) * (counts / (n - 1)).sqrt()[:, None]   # (m, d)
    gram = a @ a.T if len(a) <= a.shape[1] else a.T @ a                             # the smaller of the two
    trace_root = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum()
    spread = (counts * ((f - mu) ** 2).sum(1)).sum() / (n - 1)                       # tr Σ
    return float(((mu - ref_mu) ** 2).sum() + spread + ref_trace - 2 * trace_root)


def kernel_inception_distance(sample_features, reference_features, seed=0):
    """(mean, standard deviation) of the unbiased MMD² with the kernel (x·y / 2048 + 1)³ (Bińkowski et al. 2018)
    over KID_SUBSETS random subsets of each, sized to the smaller set: torch-fidelity's implementation."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    size = min(len(sample_features), len(reference_features))
    kid = kid_features_to_metric(torch.as_tensor(sample_features), torch.as_tensor(reference_features),
                                 kid_subsets=KID_SUBSETS, kid_subset_size=size, rng_seed=seed, verbose=False)
    return kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]


def precision_recall(sample_features, reference_features):
    """(precision, recall) (Kynkäänniemi et al. 2019): the share of samples inside a reference image's ball to its
    PRC_NEIGHBOURHOOD-th nearest reference image, and of reference images inside a sample's; torch-fidelity's
    implementation, in batches (its memory-saving form, the same figures)."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
    prc = prc_features_to_metric(torch.as_tensor(sample_features), torch.as_tensor(reference_features),
                                 prc_neighborhood=PRC_NEIGHBOURHOOD, save_cpu_ram=True, verbose=False)
    return prc[KEY_METRIC_PRECISION], prc[KEY_METRIC_RECALL]


def sample_metrics(sample_features, reference, seed=0):
    """FID with how far a second draw could land, KID and precision/recall of sample features (N, 2048) against the
    Reference: metrics_<run>.json's entries (KID or precision/recall None when a set is too small for them)."""
    mu, sigma = moments(sample_features)
    second_draw, _ = fid_second_draw(sample_features, reference.mu, reference.sigma, seed=seed)
    n, ref = len(sample_features), reference.features
    kid = kernel_inception_distance(sample_features, ref, seed) if min(n, len(ref)) >= 2 else (None, None)
    ref = ref[evenly_spread(torch.arange(len(ref)), n)]                    # as many reference images as samples
    big_enough = min(n, len(ref)) > PRC_NEIGHBOURHOOD
    precision, recall = precision_recall(sample_features, ref) if big_enough else (None, None)
    return {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma), "fid_second_draw": second_draw,
            "kid": kid[0], "kid_std": kid[1], "prc_precision": precision, "prc_recall": recall}


def metrics_protocol(samples, reference):
    """How sample_metrics read its figures, for the JSON."""
    return {"fid_half_samples": HALF_SAMPLES, "kid_subsets": KID_SUBSETS,
            "kid_subset_size": min(samples, len(reference.features)), "prc_neighbourhood": PRC_NEIGHBOURHOOD,
            "prc_reference_images": min(samples, len(reference.features)),
            "features_reference": reference.features_source}


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


def read_checked_npz(path, problem_of, what="statistics"):
    """(the npz's entries, None), or (None, what is wrong with them: problem_of's answer); pickled objects are never
    loaded."""
    try:
        with np.load(path) as npz:
            entries = {key: npz[key] for key in npz.files}
        stats_identity(entries)  # its dataset and shape entries, when it has them, must be readable
    except Exception as e:
        return None, f"it is not a readable npz of {what} ({type(e).__name__})"
    problem = problem_of(entries)
    return (None, problem) if problem else (entries, None)


@dataclass(frozen=True)
class Reference:
    """What the samples are compared with, and where it comes from (for the printed line and the JSON)."""
    mu: np.ndarray        # (2048,) float64
    sigma: np.ndarray     # (2048, 2048) float64
    source: str           # e.g. "the train split at data/cifar10" or "--fid_ref_stats stats.npz"
    images: int = None    # how many images they describe (None: a file that does not say)
    features: torch.Tensor = None  # (N, 2048) float32: a split's pool features, for KID and precision/recall
    features_source: str = None    # which split they are of (the train split's with --fid_ref_stats)


def ref_statistics_file(stats_path, model_facts):
    """The Reference of --fid_ref_stats: FID statistics of the data the model was trained on (UserError otherwise)."""
    ref, problem = read_checked_npz(stats_path, statistics_problem)
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


def features_problem(entries):
    """What keeps an npz's entries from being a reference features cache (None: nothing): features (N, 2048) of
    CACHED_FEATURES, finite."""
    features = entries.get("features")
    if features is None or features.ndim != 2 or features.shape[1] != FEATURES or features.dtype != CACHED_FEATURES:
        return f"it holds no features (N, {FEATURES}) of {np.dtype(CACHED_FEATURES).name}"
    if not np.isfinite(features).all():
        return "its features hold NaN or infinite values"
    return None


CACHES = {"stats": ("the FID reference statistics", statistics_problem, "statistics"),  # kind: (what it is, its
          "features": ("the reference features", features_problem, "features")}           # check, what it holds)


def from_cache(path, kind, num_images, identity, fingerprint):
    """A cache's entries when this network made it from these images; None when absent, or (with a note) stale."""
    if not path or not os.path.isfile(path):
        return None
    what, problem_of, holds = CACHES[kind]
    cached, problem = read_checked_npz(path, problem_of, holds)
    why = (f"is damaged ({problem})" if problem else
           "does not record which network made it (an older version's)" if "network" not in cached else
           "was made by another --fid_inception network" if str(cached["network"]) != fingerprint else
           "was made from other images" if "n" not in cached or int(cached["n"]) != num_images
           or stats_identity(cached) != identity else None)
    if why:
        print(f"note: {what} {path} {why}: computing them again", file=sys.stderr)
        return None
    return cached


def write_cache(path, identity, fingerprint, **arrays):
    """Writes a reference cache, keyed as from_cache reads it; a read-only or full data folder is left as it is (the
    cache is made again next time)."""
    if not path:
        return
    try:
        with atomic_open(path) as f:
            np.savez(f, **arrays, dataset=identity[0], shape=np.array(identity[1:]), network=fingerprint)
    except WriteError:
        pass


def split_reference(net, images_uint8, split, data_dir, model_facts, progress=False):
    """(mu, sigma, features (N, 2048) float32 holding float16's values) of the `split` images (N, C, H, W) uint8:
    each from its cache beside the data when this network made it from these images, else from one pass, then
    cached."""
    identity, n = fid_identity(model_facts), len(images_uint8)
    if n < 2:
        raise UserError(f"--eval_fid compares with the {split} split at {data_dir}, which holds {n} image: a "
                        "covariance needs at least 2")
    paths = {kind: os.path.join(data_dir, stats_cache_name(split, model_facts["dataset"], kind))
             if os.path.isdir(data_dir) else None for kind in CACHES}
    stats = from_cache(paths["stats"], "stats", n, identity, net.fingerprint)
    stats = stats and (stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64))
    features = from_cache(paths["features"], "features", n, identity, net.fingerprint)
    features = features and torch.from_numpy(features["features"])
    if stats is None or features is None:
        announce_pass(net, n, split, paths["features"])
        fresh, _ = net.pool_features(images_uint8.permute(0, 2, 3, 1).numpy(), progress=progress)
        if stats is None:
            stats = moments(fresh)
            write_cache(paths["stats"], identity, net.fingerprint, mu=stats[0], sigma=stats[1].astype(np.float32), n=n)
        if features is None:
            features = torch.from_numpy(fresh.numpy().astype(CACHED_FEATURES))
            write_cache(paths["features"], identity, net.fingerprint, features=features.numpy(), n=n)
    return stats[0], stats[1], features.float()


def announce_pass(net, count, split, path):
    """Says, before a reference pass that takes more than LONG_PASS_S, how long it takes and where it is kept."""
    seconds = count * net.seconds_per_image
    if seconds > LONG_PASS_S:
        kept = f", kept in {path} ({count * FEATURES * 2 / 1e6:,.0f} MB)" if path else ""
        print(f"note: computing the Inception features of the {count:,} {split} images (once; about "
              f"{seconds / 60:.0f} min on {net.device.type}){kept}", file=sys.stderr)


def evaluation_data(data_dir, dataset, model_facts):
    """The data at data_dir (load_dataset's dict), which must be the model's: the samples are compared with it."""
    data = load_dataset(data_dir, dataset)
    facts = data_facts(data)
    if fid_identity(facts) != fid_identity(model_facts) or facts["classes"] != model_facts["classes"]:
        raise UserError(f"--data_dir {data_dir!r} holds {describe_data(facts)}, but the model was trained on "
                        f"{describe_data(model_facts)}: FID compares with the training data; point --data_dir at it")
    return data
