"""Data: an image-folder tree or a torchvision dataset (CIFAR-10, CIFAR-100, MNIST, Fashion-MNIST) as uint8 tensors,
the padding that fits any image size to the U-Net, and the device-resident batch loader that feeds training
(cifar10-airbench style: no DataLoader on the hot path)."""
import contextlib
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ddpm_helpers import UserError, WriteError, atomic_torch_save, input_file_problem, stderr_is_terminal
from ddpm_pictures import to_model_range

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_NAME = "ddpm_uint8_cache.pt"
CACHE_VERSION = 2         # 2: images keep their channel count (1 for grayscale folders)
DEFAULT_DATA_DIR = "./data"  # where torchvision downloads its datasets when no --data_dir is given
# --dataset: a train/ test/ image-folder tree, or a torchvision dataset (class name, image size) downloaded there
TORCHVISION_DATASETS = {"cifar10": ("CIFAR10", (32, 32)), "cifar100": ("CIFAR100", (32, 32)),
                        "mnist": ("MNIST", (28, 28)), "fashion_mnist": ("FashionMNIST", (28, 28))}
DATASETS = (*TORCHVISION_DATASETS, "folder")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _list_image_folder(root):
    """[(path, class_index)] and the class names of a folder of class sub-folders, sorted by name; UserError for an
    image name that is not a regular file (a FIFO would block the read)."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = []
    for index, name in enumerate(classes):
        with os.scandir(os.path.join(root, name)) as entries:
            images = sorted((entry for entry in entries if entry.name.lower().endswith(IMAGE_EXTENSIONS)),
                            key=lambda entry: entry.name)
        odd = next((entry.path for entry in images if not entry.is_file()), None)
        if odd:
            raise UserError(f"{odd} is not a regular image file ({input_file_problem(odd) or 'a folder'}); remove it")
        files += [(entry.path, index) for entry in images]
    return files, classes


MAX_IMAGE_PIXELS = 4096 * 4096  # the largest training image read: its header is checked before it is decoded


@contextlib.contextmanager
def open_image(path):
    """The image at path, opened (nothing decoded) once its header says at most MAX_IMAGE_PIXELS: a decompression
    bomb is a UserError before any memory goes to it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise UserError(f"the image {path} claims more pixels than any image can hold; remove or replace it") \
            from None
    with im:
        if im.width * im.height > MAX_IMAGE_PIXELS:
            raise UserError(f"the image {path} is {im.width}×{im.height} pixels, more than the "
                            f"{MAX_IMAGE_PIXELS:,} a training image may have; remove or replace it")
        yield im


def _decode(path, mode=None):
    """The image at path as uint8 (H, W) in mode 'L' or (H, W, 3) in 'RGB' (None: 'L' for any grey file, else
    'RGB'); UserError for a file PIL cannot read."""
    try:
        with open_image(path) as im:
            if mode is None:
                mode = "L" if im.mode in ("1", "L", "LA", "La", "F") or im.mode.startswith("I") else "RGB"
            return np.asarray(im.convert(mode))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read the image {path} ({type(e).__name__}: {e}); remove or replace it") from None


def majority_mode(arrays):
    """The mode most decoded images have ('L' or 'RGB'; RGB on a tie), and how many have the other."""
    grey = sum(a.ndim == 2 for a in arrays)
    return ("L", len(arrays) - grey) if grey > len(arrays) / 2 else ("RGB", grey)


def _decode_all(paths, root):
    """The images at paths, decoded in threads, as uint8 (N, C, H, W) in their majority mode, and how many were
    converted to it."""
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        arrays = list(tqdm(pool.map(_decode, paths), total=len(paths), leave=False,
                           desc=f"decoding {root} (once; cached)", disable=not stderr_is_terminal()))
        mode, converted = majority_mode(arrays)
        others = [i for i, a in enumerate(arrays) if (a.ndim == 2) != (mode == "L")]
        again = pool.map(_decode, [paths[i] for i in others], [mode] * len(others))  # in the majority's mode
        for i, array in zip(others, again):
            arrays[i] = array
    shapes = {a.shape[:2] for a in arrays}
    if len(shapes) != 1:
        raise UserError(f"images under {root} differ in size ({sorted(shapes)[:3]}…); all must share one size")
    images = torch.from_numpy(np.stack(arrays))                                  # (N, H, W) or (N, H, W, 3)
    return (images[:, None] if mode == "L" else images.permute(0, 3, 1, 2)).contiguous(), converted  # (N, C, H, W)


def _is_image_folder_layout(data_dir):
    return all(os.path.isdir(os.path.join(data_dir, split)) for split in ("train", "test"))


def _load_image_folders(data_dir):
    """Both splits of an image-folder dataset, through a uint8 cache file beside it; a folder mixing grey and colour
    is converted to the mode most files have ('mode_note')."""
    cache_path = os.path.join(data_dir, CACHE_NAME)
    listings = {split: _list_image_folder(os.path.join(data_dir, split)) for split in ("train", "test")}
    counts = [len(files) for files, _ in listings.values()]
    if os.path.isfile(cache_path):
        cached, problem = _read_cache(cache_path, counts, listings["train"][1], image_size_of(data_dir, "folder"))
        if cached is not None:
            return cached
        if problem:  # a stale cache (other files, an older version) is decoded again without a word
            print(f"warning: the decode cache {cache_path} is damaged ({problem}); decoding the images again",
                  file=sys.stderr)
    for split, (files, _) in listings.items():
        if not files:
            raise UserError(f"no images (.png/.jpg) in the class folders of {os.path.join(data_dir, split)}")
    if listings["test"][1] != listings["train"][1]:
        raise UserError(f"{data_dir}: train/ and test/ have different class folders")
    images, converted = _decode_all([path for files, _ in listings.values() for path, _ in files], data_dir)
    data = {"classes": listings["train"][1], "file_counts": counts, "version": CACHE_VERSION, "mode_note": None,
            "train_images": images[:counts[0]], "test_images": images[counts[0]:]}
    for split, (files, _) in listings.items():
        data[f"{split}_labels"] = torch.tensor([label for _, label in files], dtype=torch.long)
    if converted:
        kinds = ("grayscale", "colour") if images.shape[1] == 1 else ("colour", "grayscale")
        data["mode_note"] = (f"{converted} of {sum(counts)} images under {data_dir} are {kinds[1]} and were converted "
                             f"to {kinds[0]}, the mode of most of them")
    try:
        atomic_torch_save(data, cache_path)
    except WriteError:
        pass  # a read-only or full data folder still works, it is just decoded every run
    return data


def _read_cache(path, counts, classes, image_size):
    """(the decode cache at path, None) when it holds the listed folders' images; (None, None) when stale; (None,
    what is wrong) when damaged."""
    try:
        cached = torch.load(path, weights_only=True)
    except Exception as e:
        return None, f"unreadable: {type(e).__name__}"
    if not isinstance(cached, dict):
        return None, "not a dict"
    if cached.get("file_counts") != counts or cached.get("version") != CACHE_VERSION:
        return None, None
    for split, count in zip(("train", "test"), counts):
        images, labels = cached.get(f"{split}_images"), cached.get(f"{split}_labels")
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
                and len(images) == count and images.shape[1] in (1, 3)):
            return None, f"its {split} images are not {count} uint8 images (N, C, H, W)"
        if not (isinstance(labels, torch.Tensor) and labels.shape == (count,) and labels.dtype == torch.long
                and (count == 0 or 0 <= labels.min() <= labels.max() < len(classes))):
            return None, f"its {split} labels are not {count} class indices"
    if cached.get("classes") != classes or cached["train_images"].shape[1:] != cached["test_images"].shape[1:]:
        return None, "its class names or image shapes do not match the folders'"
    if image_size is not None and tuple(cached["train_images"].shape[-2:]) != tuple(image_size):
        return None, None  # the images were replaced by others of another size
    return {**cached, "mode_note": cached.get("mode_note")}, None


def _load_torchvision(dataset, data_dir):
    """A torchvision dataset, downloaded into data_dir unless it is there already."""
    import torchvision

    class_name = TORCHVISION_DATASETS[dataset][0]
    top = _first_missing_folder(data_dir) or data_dir  # the download may make the folders above data_dir too
    folders_before = _folders_under(top)
    try:
        splits = [getattr(torchvision.datasets, class_name)(data_dir, train=train, download=True)
                  for train in (True, False)]
    except Exception as e:
        for folder in sorted(_folders_under(top) - folders_before, key=len, reverse=True):  # deepest first
            if not os.listdir(folder):  # made for the download, and left empty by it
                os.rmdir(folder)
        problem = " ".join(f"{type(e).__name__}: {e}".split())  # torchvision's messages span several lines
        raise UserError(
            f"{class_name} is not in --data_dir {data_dir!r} and could not be downloaded "
            f"({problem[:200]}{'…' if len(problem) > 200 else ''}). Either let torchvision download it (needs "
            "internet), or point --data_dir at a folder holding train/<class>/*.png|jpg and test/<class>/*.png|jpg"
        ) from None
    data = {"classes": list(splits[0].classes), "mode_note": None}
    for name, ds in zip(("train", "test"), splits):
        images = torch.as_tensor(np.asarray(ds.data))          # (N, H, W, 3) (CIFAR) or (N, H, W) (MNIST)
        images = images[..., None] if images.dim() == 3 else images
        data[f"{name}_images"] = images.permute(0, 3, 1, 2).contiguous()              # (N, C, H, W)
        data[f"{name}_labels"] = torch.as_tensor(ds.targets, dtype=torch.long)
    return data


def _first_missing_folder(path):
    """The outermost folder of `path` that does not exist (None: it exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def _folders_under(root):
    """root and every folder below it (nothing when root does not exist)."""
    return {path for path, _, _ in os.walk(root)}


def resolve_dataset(dataset, data_dir):
    """What --data_dir holds: --dataset, else 'folder' when it holds train/ or test/, else 'cifar10'."""
    if dataset is not None:
        return dataset
    return "folder" if any(os.path.isdir(os.path.join(data_dir, s)) for s in ("train", "test")) else "cifar10"


def image_size_of(data_dir, dataset=None):
    """(height, width) of the dataset's images, from the first training image's header for a folder; None when
    unreadable (load_dataset then says why)."""
    dataset = resolve_dataset(dataset, data_dir)
    if dataset != "folder":
        return TORCHVISION_DATASETS[dataset][1]
    try:
        files, _ = _list_image_folder(os.path.join(data_dir, "train"))
        with open_image(files[0][0]) as im:
            return im.height, im.width
    except (OSError, IndexError, ValueError):
        return None


def load_dataset(data_dir, dataset=None):
    """The dataset at data_dir as uint8 tensors: {train_images (N, C, H, W), train_labels (N,), test_images,
    test_labels, classes, dataset (one of DATASETS), mode_note (None, or how many images were converted)}."""
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir!r} is a file, not a folder")
    if dataset is None and data_dir != DEFAULT_DATA_DIR and not os.path.exists(data_dir):
        raise UserError(f"--data_dir {data_dir!r} does not exist: give an image-folder dataset "
                        "(train/<class>/*.png|jpg and test/<class>/*.png|jpg), or name --dataset to download one "
                        "into it")
    dataset = resolve_dataset(dataset, data_dir)
    if dataset != "folder":
        data = {**_load_torchvision(dataset, data_dir), "dataset": dataset}
    else:
        require_image_folder(data_dir)
        data = {**_load_image_folders(data_dir), "dataset": "folder"}
    if len(data["train_images"]) < 2:
        raise UserError(f"--data_dir {data_dir!r} holds {len(data['train_images'])} training image; training needs at "
                        "least 2 (one to train on, one to validate)")
    return data


def require_image_folder(data_dir):
    """UserError unless data_dir is a train/ test/ image-folder tree."""
    if not _is_image_folder_layout(data_dir):
        present = [s for s in ("train", "test") if os.path.isdir(os.path.join(data_dir, s))]
        holds = (f"holds {present[0]}/ but not {'test' if present[0] == 'train' else 'train'}/" if present
                 else "holds no train/ and test/ folders")
        raise UserError(f"--data_dir {data_dir!r} {holds}: an image-folder dataset needs both "
                        "train/<class>/*.png|jpg and test/<class>/*.png|jpg")


def data_facts(data):
    """What a model trained on the loaded dataset must know of it: dataset, classes, channels, data_size [H, W]."""
    return {"dataset": data["dataset"], "classes": list(data["classes"]),
            "channels": data["train_images"].shape[1], "data_size": list(data["train_images"].shape[-2:])}


def trained_data(config):
    """The data facts of what a config's model was trained on (older checkpoints: square colour images, CIFAR-10
    when the class names are CIFAR-10's, else a folder)."""
    classes, side = config.get("classes") or [], config["image_size"]
    return {"dataset": config.get("dataset") or ("cifar10" if classes == CIFAR10_CLASSES else "folder"),
            "classes": classes, "channels": config["model"].get("channels", 3),
            "data_size": config.get("data_size") or [side, side]}


def data_conflicts(saved_config, facts):
    """{what: (checkpoint's, data's)} where the data differs from the model's: class names, channels, image size."""
    saved = trained_data(saved_config)
    return {key: (saved[key], facts[key]) for key in ("classes", "channels", "data_size") if saved[key] != facts[key]}


def require_trained_data(config, facts, data_dir, flag):
    """UserError, naming `flag`, when the data at data_dir (its facts) is not what the model was trained on."""
    conflicts = data_conflicts(config, facts)
    if conflicts:
        raise UserError(f"{flag}: the data at {data_dir!r} is not what the model was trained on ("
                        + "; ".join(f"{key} {data_text(old)} for the model, {data_text(new)} here"
                                    for key, (old, new) in conflicts.items())
                        + "); point --data_dir (and --dataset) at the model's data")


def data_text(value):
    """A data fact for people: class lists shortened ('10: airplane, automobile, …'), sizes as H×W."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        return f"{len(value)}: {', '.join(value[:3])}{', …' if len(value) > 3 else ''}"
    return "×".join(map(str, value)) if isinstance(value, list) else str(value)


def describe_data(facts):
    """A dataset's facts for people: 'mnist: 28×28 grayscale, 10 classes'."""
    h, w = facts["data_size"]
    return (f"{facts['dataset']}: {h}×{w} {'grayscale' if facts['channels'] == 1 else 'colour'}, "
            f"{len(facts['classes'])} classes")


# ------------------------------------------------------------------------ fitting any size to the U-Net

def stages_allowed(data_size):
    """The most U-Net stages that images of data_size (H, W) allow, padded: the innermost works on at least 1 × 1."""
    return max(data_size).bit_length()


def check_stage_count(dim_mults, image_size):
    """UserError when the U-Net has more stages than images of image_size (H, W; None: unknown) allow."""
    if image_size is not None and len(dim_mults) > stages_allowed(image_size):
        raise UserError(f"--dim_mults {','.join(map(str, dim_mults))} has {len(dim_mults)} stages, which need "
                        f"images of at least {2 ** (len(dim_mults) - 1)} pixels a side; these images are "
                        f"{image_size[0]}×{image_size[1]}, which allow at most {stages_allowed(image_size)} stages")


def model_side(data_size, stages):
    """The side of the U-Net's square for data_size (H, W): the smallest multiple of 2^(stages − 1) holding both."""
    unit = 2 ** (stages - 1)
    return -(-max(data_size) // unit) * unit


def padding(data_size, side):
    """(left, right, top, bottom) pixels centring H × W in side × side (an odd one extra goes right or down)."""
    h, w = data_size
    return (side - w) // 2, side - w - (side - w) // 2, (side - h) // 2, side - h - (side - h) // 2


def pad_to_side(images, side):
    """Images (N, C, H, W) centred in side × side by repeating their edge pixels; unchanged when they fit."""
    pad = padding(images.shape[-2:], side)
    return F.pad(images, pad, mode="replicate") if any(pad) else images


def crop_to_data(images, data_size):
    """Model-sized samples (N, C, S, S) cut back to the data's H × W: the centre, where pad_to_side put the images."""
    h, w = data_size
    left, _, top, _ = padding(data_size, images.shape[-1])
    return images[..., top:top + h, left:left + w]


def evenly_spread(indices, count):
    """`count` of the indices (all when there are fewer), evenly spaced: in a class-sorted split, every class."""
    if len(indices) <= count:
        return indices
    return indices[torch.linspace(0, len(indices) - 1, count).round().long()]


def train_val_split(num_images, seed=0):
    """Indices of a fixed 90 / 10 split (45,000 / 5,000 for CIFAR-10's 50,000 training images)."""
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    num_val = max(1, num_images // 10)
    return perm[num_val:], perm[:num_val]


class DeviceLoader:
    """A whole split held on the device as uint8, batched without a DataLoader (cifar10-airbench style).

    Each epoch's order and flips come from a generator seeded by (seed, epoch): replayed exactly on resume, split
    across ranks (rank r takes every world_size-th index). Yields (float (B, C, side, side) in [−1, 1], labels (B,))."""

    def __init__(self, images_uint8, labels, batch_size, device, shuffle=True, flip=True, seed=0,
                 rank=0, world_size=1, side=None):
        self.images = images_uint8.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.device = batch_size, device
        self.shuffle, self.flip, self.seed = shuffle, flip, seed
        self.rank, self.world_size = rank, world_size
        self.side = side or max(images_uint8.shape[-2:])

    def __len__(self):
        return -(-self.num_local // self.batch_size)

    @property
    def num_local(self):
        return len(self.images) // self.world_size

    def epoch_indices(self, epoch):
        """This rank's image indices and flip flags for the epoch, both (num_local,); with several ranks the order is
        cut to a multiple of world_size, so every rank runs the same number of steps."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2 ** 64)  # any seed: the generator's range
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
            x = to_model_range(self.images[idx])                                        # (B, C, H, W)
            x = torch.where(flips[start:start + self.batch_size, None, None, None], x.flip(3), x)
            yield pad_to_side(x, self.side), self.labels[idx]                          # (B, C, side, side)
