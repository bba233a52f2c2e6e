"""Data: CIFAR-10 (torchvision download) or any train/ test/ image-folder tree, as uint8 tensors, and the
device-resident batch loader that feeds training (cifar10-airbench style: no DataLoader on the hot path)."""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ddpm_helpers import UserError, atomic_torch_save, stderr_is_terminal, to_model_range

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_NAME = "ddpm_uint8_cache.pt"
DEFAULT_DATA_DIR = "./data"  # where torchvision downloads CIFAR-10 when no --data_dir is given


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
    """The image at path as uint8 (H, W, 3); a file PIL cannot read (corrupt, truncated) is a UserError naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read the image {path} ({type(e).__name__}: {e}); remove or replace it") from None


def _decode_image_folder(root):
    """Decode a class-folder tree to uint8 images (N, 3, H, W) and labels (N,)."""
    files, classes = _list_image_folder(root)
    if not files:
        raise UserError(f"no images (.png/.jpg) in the class folders of {root}")
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


def image_size_of(data_dir):
    """(height, width) of the dataset's images, from the first training image's header alone (32 × 32 for
    torchvision's CIFAR-10); None when it cannot be read, which load_dataset then reports."""
    if not _is_image_folder_layout(data_dir):
        return (32, 32)
    try:
        files, _ = _list_image_folder(os.path.join(data_dir, "train"))
        with Image.open(files[0][0]) as im:
            return im.height, im.width
    except (OSError, IndexError, ValueError):
        return None


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
