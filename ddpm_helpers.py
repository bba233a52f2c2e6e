"""Data, checkpoints, images, plots and small utilities for ddpm_main.py."""
import json
import os
import platform
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

CHECKPOINT_FORMAT = "ddpm-cifar10"
CHECKPOINT_VERSION = 1
TOOL_VERSION = "0.1.0"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_NAME = "ddpm_uint8_cache.pt"
FID_STATS_NAME = "ddpm_fid_train_stats.npz"


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------- data

def _list_image_folder(root):
    """[(path, class_index)] and the class names of a folder of class sub-folders, sorted by name."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = []
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        files += [(os.path.join(folder, f), index) for f in sorted(os.listdir(folder))
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    return files, classes


def _decode(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _decode_image_folder(root):
    """Decode a class-folder tree to uint8 images (N, 3, H, W) and labels (N,)."""
    files, classes = _list_image_folder(root)
    if not files:
        raise UserError(f"no images (.png/.jpg) in the class folders of {root}")
    from tqdm.auto import tqdm
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        arrays = list(tqdm(pool.map(_decode, [f for f, _ in files]), total=len(files), leave=False,
                           desc=f"decoding {root} (once; cached)", disable=not stderr_is_terminal()))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise UserError(f"images under {root} differ in size ({sorted(shapes)[:3]}…); all must share one size")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()   # (N, 3, H, W) uint8
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return images, labels, classes


def _is_image_folder_layout(data_dir):
    return all(os.path.isdir(os.path.join(data_dir, split)) for split in ("train", "test"))


def _load_image_folders(data_dir):
    """Both splits of an image-folder dataset, through a uint8 cache file beside it."""
    cache_path = os.path.join(data_dir, CACHE_NAME)
    counts = [len(_list_image_folder(os.path.join(data_dir, s))[0]) for s in ("train", "test")]
    if os.path.isfile(cache_path):
        try:
            cached = torch.load(cache_path, weights_only=True)
            if cached.get("file_counts") == counts:
                return cached
        except Exception:
            pass  # unreadable or stale cache: decode again and rewrite it
    train_images, train_labels, classes = _decode_image_folder(os.path.join(data_dir, "train"))
    test_images, test_labels, test_classes = _decode_image_folder(os.path.join(data_dir, "test"))
    if test_classes != classes:
        raise UserError(f"{data_dir}: train/ and test/ have different class folders")
    data = dict(train_images=train_images, train_labels=train_labels, test_images=test_images,
                test_labels=test_labels, classes=classes, file_counts=counts)
    try:
        atomic_torch_save(data, cache_path)
    except OSError:
        pass  # a read-only data folder still works, it is just decoded every run
    return data


def _load_torchvision_cifar10(data_dir):
    import torchvision

    existed = os.path.isdir(data_dir)
    try:
        splits = [torchvision.datasets.CIFAR10(data_dir, train=train, download=True) for train in (True, False)]
    except Exception as e:
        if not existed and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)
        raise UserError(
            f"CIFAR-10 is not in --data_dir {data_dir!r} and could not be downloaded ({type(e).__name__}: {e}). "
            "Either let torchvision download it (needs internet), or point --data_dir at a folder holding "
            "train/<class>/*.png|jpg and test/<class>/*.png|jpg") from None
    data = {}
    for name, ds in zip(("train", "test"), splits):
        data[f"{name}_images"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        data[f"{name}_labels"] = torch.tensor(ds.targets, dtype=torch.long)
    data["classes"] = list(splits[0].classes)
    return data


def load_dataset(data_dir):
    """CIFAR-10 (or any image-folder dataset) as uint8 tensors.

    Returns a dict with train_images (N, 3, H, W) uint8, train_labels (N,), test_images, test_labels
    and classes. An image-folder tree (data_dir/train/<class>/*, data_dir/test/<class>/*) is read when
    present; otherwise torchvision's CIFAR-10 is downloaded into data_dir.
    """
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir!r} is a file, not a folder")
    if _is_image_folder_layout(data_dir):
        return _load_image_folders(data_dir)
    present = [s for s in ("train", "test") if os.path.isdir(os.path.join(data_dir, s))]
    if present:
        raise UserError(f"--data_dir {data_dir!r} holds {present[0]}/ but not "
                        f"{'test' if present[0] == 'train' else 'train'}/: an image-folder dataset needs both "
                        "train/<class>/*.png|jpg and test/<class>/*.png|jpg")
    return _load_torchvision_cifar10(data_dir)


def train_val_split(num_images, seed=0):
    """Indices of a fixed 90 / 10 split (45,000 / 5,000 for CIFAR-10's 50,000 training images)."""
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    num_val = max(1, num_images // 10)
    return perm[num_val:], perm[:num_val]


def to_model_range(images_uint8):
    """uint8 [0, 255] → float [−1, 1]."""
    return images_uint8.float() / 127.5 - 1


def to_uint8(images):
    """float [−1, 1] (N, C, H, W) → uint8 numpy (N, H, W, C)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class DeviceLoader:
    """A whole split held on the device as uint8, batched without a DataLoader (cifar10-airbench style).

    Each epoch's order and flips come from a generator seeded by (seed, epoch), so an epoch can be
    replayed exactly (resume) and split across ranks (rank r takes every world_size-th index).
    Yields (images in [−1, 1] as float (B, 3, H, W), labels (B,)).
    """

    def __init__(self, images_uint8, labels, batch_size, device, shuffle=True, flip=True, seed=0,
                 rank=0, world_size=1):
        self.images = images_uint8.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.device = batch_size, device
        self.shuffle, self.flip, self.seed = shuffle, flip, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        return -(-self.num_local // self.batch_size)

    @property
    def num_local(self):
        return len(self.images) // self.world_size

    def epoch_indices(self, epoch):
        """This rank's image indices and flip flags for the epoch, both (num_local,). With several ranks
        the epoch's order is cut to a multiple of world_size (at most world_size − 1 images wait for
        the next epoch's order), so every rank runs the same number of steps."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.images)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        used = n - n % self.world_size
        return order[:used][self.rank::self.world_size], flips[:used][self.rank::self.world_size]

    def batches(self, epoch=0, start_batch=0):
        order, flips = self.epoch_indices(epoch)
        order, flips = order.to(self.device), flips.to(self.device)
        for start in range(start_batch * self.batch_size, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = to_model_range(self.images[idx])                                        # (B, 3, H, W)
            x = torch.where(flips[start:start + self.batch_size, None, None, None], x.flip(3), x)
            yield x, self.labels[idx]


# ---------------------------------------------------------------------------------- checkpoints

def atomic_torch_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load and check a checkpoint written by this tool (weights_only=True: no code is unpickled)."""
    if not path:
        raise UserError("--model_path is required with --inference")
    if not os.path.exists(path):
        raise UserError(f"--model_path {path!r} does not exist")
    if not os.path.isfile(path):
        raise UserError(f"--model_path {path!r} is not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path!r} is not a readable checkpoint ({type(e).__name__}); "
                        "it is corrupt or was not written by torch.save") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "config" not in ckpt:
        raise UserError(f"{path!r} is not a checkpoint of this tool (ddpm_main.py); "
                        "it holds no 'format': 'ddpm-cifar10' entry and config")
    return ckpt


def environment_versions():
    return {"tool": TOOL_VERSION, "torch": str(torch.__version__), "python": platform.python_version()}


# ------------------------------------------------------------------------------ images and plots

def save_grid(images, path, nrow):
    """Save images in [−1, 1] (N, C, H, W) as one PNG grid with nrow images per row."""
    from torchvision.utils import save_image
    save_image(images.float().cpu(), path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)


def save_individual_pngs(images, folder, labels=None, classes=None):
    """One PNG per image: NNNNN.png, or NNNNN_<class>.png when labels are given."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # an earlier, larger batch must not leave images behind
        if re.fullmatch(r"\d{5}(_.+)?\.png", name):
            os.remove(os.path.join(folder, name))
    paths = []
    for i, array in enumerate(to_uint8(images)):
        suffix = f"_{classes[int(labels[i])]}" if labels is not None else ""
        path = os.path.join(folder, f"{i:05d}{suffix}.png")
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def save_labelled_grid(images, path, row_labels, col_labels):
    """A grid of images in [−1, 1] with a label beside each row and above each column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    rows, cols = len(row_labels), len(col_labels)
    size = images.shape[-1]
    grid = make_grid(images.float().cpu(), nrow=cols, normalize=True, value_range=(-1, 1), padding=2)
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * cols, 0.6 + 0.75 * rows), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    centres = lambda n: [2 + (size + 2) * i + size / 2 for i in range(n)]
    ax.set_yticks(centres(rows), row_labels)
    ax.set_xticks(centres(cols), col_labels, rotation=45, ha="left")
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_loss_history(history, path, title=""):
    """Train / validation / test loss per epoch as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test")):
        ax.plot(history["epochs"], history[key], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def stderr_is_terminal():
    return sys.stderr.isatty()


# ------------------------------------------------------------------------------------ runtime

class Denoiser:
    """Calls ε_θ under bf16 autocast and torch.compile when asked, always returning float32, with the
    input in the model's memory format (channels-last models — what ddpm_main builds — train 20 % and
    sample 40 % faster on the 2-core CPU, and it is the layout bf16 convolutions want on NVIDIA GPUs).

    If compilation fails (no compiler, unsupported op), it warns once and continues eagerly:
    the same function, only slower. Exposes the model's num_classes for classifier-free guidance.
    """

    def __init__(self, model, compile=False, amp=False):
        self.model = model
        self.num_classes = getattr(model, "module", model).num_classes  # through a DistributedDataParallel
        self.amp = amp
        self.device_type = next(model.parameters()).device.type
        conv_weight = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)  # (O, I, k, k)
        self.memory_format = torch.contiguous_format if conv_weight.is_contiguous() else torch.channels_last
        self.forward = torch.compile(model) if compile else model
        self.compiled = compile

    def __call__(self, x, t, class_labels=None):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            try:
                out = self.forward(x.contiguous(memory_format=self.memory_format), t, class_labels)
            except torch.OutOfMemoryError:
                raise  # not a compilation problem: eager would run out of memory too
            except Exception as e:
                if not self.compiled:
                    raise
                print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "continuing without compilation (--no_compile silences this)", file=sys.stderr)
                self.forward, self.compiled = self.model, False
                out = self.model(x, t, class_labels)
        return out.float()


# ---------------------------------------------------------------------------------------- FID

def load_inception(path, device):
    """The TF-Inception (2015-12-05) pool-feature TorchScript used by the standard FID; `.xz` accepted.
    Input: float (N, 3, 299, 299) = (pixels − 128) / 128; output: (N, 2048)."""
    if not path or not os.path.isfile(path):
        raise UserError(f"--fid_inception {path!r} is not a file: FID needs the TF-Inception TorchScript "
                        "(inception-2015-12-05 pool features, as used by StyleGAN2-ADA / EDM), optionally .xz")
    try:
        if path.endswith(".xz"):
            import io
            import lzma
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
        from tqdm.auto import tqdm
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


def reference_statistics(features, images_uint8, cache_path, progress=False):
    """FID statistics of the training images, cached in an .npz keyed by the image count."""
    if cache_path and os.path.isfile(cache_path):
        cached = np.load(cache_path)
        if int(cached["n"]) == len(images_uint8):
            return cached["mu"], cached["sigma"].astype(np.float64)
    mu, sigma = features.statistics(images_uint8, progress=progress)
    if cache_path:
        tmp = f"{cache_path}.tmp{os.getpid()}.npz"
        try:
            np.savez(tmp, mu=mu, sigma=sigma.astype(np.float32), n=len(images_uint8))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only data folder: the statistics are recomputed next time
    return mu, sigma


def export_for_inference(ckpt, path):
    """Write a small inference-only checkpoint: config and EMA weights in bf16 (no optimizer, no raw weights).
    The training machine's data folder means nothing elsewhere: the config's data_dir becomes the default."""
    weights = ckpt.get("ema") or ckpt["model"]
    config = {**ckpt["config"], "data_dir": "./data"}
    small = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
             "versions": environment_versions(), "ema": {k: v.to(torch.bfloat16) for k, v in weights.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_torch_save(small, path)


# ------------------------------------------------------------------------------- distributed

def init_distributed(use_cuda):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU) and return
    (rank, world_size, local_rank); otherwise (0, 1, 0) and nothing changes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def all_ranks_mean(value, world_size):
    """The mean of a device scalar over ranks (itself when single-process)."""
    if world_size == 1:
        return value
    import torch.distributed as dist
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size


def max_over_ranks(values, world_size):
    """The element-wise maximum of a list of numbers (or booleans) over ranks, as floats, so that every
    rank takes the same decision."""
    if world_size == 1:
        return [float(v) for v in values]
    import torch.distributed as dist
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def barrier(world_size):
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()
