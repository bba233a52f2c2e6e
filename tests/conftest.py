"""Shared fixtures: tiny image-folder datasets generated on the fly (never the real CIFAR-10), and a stand-in
for the FID network's weights file (never downloaded)."""
import contextlib
import io
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MAIN = os.path.join(ROOT, "ddpm_main.py")
SHIPPED = os.path.join(ROOT, "models", "cifar10_cond_speedrun", "ckpt.pt")  # the shipped model: 10 classes
from ddpm_diffusion import Diffusion, cosine_beta_schedule  # noqa: E402
from ddpm_fid import write_random_inception  # noqa: E402
from ddpm_model import UNet, UNetConfig  # noqa: E402
# float32: a U-Net this small trains slower under bf16 autocast than without (the casts outweigh the arithmetic), and
# runs the same on every CPU; tests/test_gpu_branches.py runs the other precisions
TINY_MODEL = ["--dim", "8", "--dim_mults", "1,2", "--timesteps", "10", "--batch_size", "8", "--no_cuda",
              "--precision", "fp32"]


def make_image_folder(root, per_class_train=3, per_class_test=1, num_classes=10, size=16, seed=0, class_names=None,
                      mode="RGB"):
    """train/<class>/*.png and test/<class>/*.png of random images (mode 'RGB' or 'L'); each class has its own mean
    colour. Class folders are named class_names, else '<c>_class<c>'."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        for c in range(num_classes):
            folder = os.path.join(root, split, class_names[c] if class_names else f"{c}_class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                base = rng.integers(0, 255, channels)
                pixels = np.clip(base + rng.normal(0, 30, (size, size, channels)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels[..., 0] if mode == "L" else pixels).save(os.path.join(folder, f"{i:04d}.png"))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("tiny_data")))


def run_cli(*args, cwd, timeout=300, env=None):
    """Run ddpm_main.py as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, MAIN, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def tree(root):
    """Every file and folder under root, relative to it, with each file's bytes: to compare before and after."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def one_line_error(result, code=2):
    """The one line a command that stopped with exit status `code` said (notes and warnings aside), no traceback."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("note:", "warning:"))]
    assert len(lines) == 1 and lines[0].startswith("ddpm_main.py: error: "), result.stderr
    return lines[0]


def run_main(*args, cwd):
    """ddpm_main.main(args) in this process, in the folder cwd, as run_cli runs it in a new one but without the
    seconds a new process spends importing torch. Returns a CompletedProcess: exit status, stdout, stderr."""
    import ddpm_main
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            ddpm_main.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory):
    """One conditional and one unconditional 1-epoch run (models/cond, models/uncond), shared by tests."""
    cwd = tmp_path_factory.mktemp("runs")
    for name, extra in (("cond", ["--conditional", "--p_uncond", "0.2"]), ("uncond", [])):
        result = run_main("--data_dir", tiny_data, "--epochs", "1", "--save_model", "--run_name", name,
                         *TINY_MODEL, *extra, cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    return cwd


@pytest.fixture(scope="session", autouse=True)
def local_downloads_only(tmp_path_factory):
    """Tests never touch the network, nor the user's download cache: torch's hub folder (where the tool keeps what it
    fetches) is a new empty folder, and a fetch from anywhere but 127.0.0.1 or a file:// URL fails the test."""
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch_home"))
    real_urlopen = urllib.request.urlopen

    def local_urlopen(url, *args, **kwargs):
        parts = urllib.parse.urlsplit(url if isinstance(url, str) else url.full_url)
        assert parts.scheme == "file" or parts.hostname == "127.0.0.1", f"a test tried to fetch {url}"
        return real_urlopen(url, *args, **kwargs)

    urllib.request.urlopen = local_urlopen
    yield
    urllib.request.urlopen = real_urlopen


@pytest.fixture(scope="session")
def fake_inception(tmp_path_factory):
    """A stand-in for torch-fidelity's Inception weights file: its format and shapes, random weights (seed 0)."""
    return write_random_inception(str(tmp_path_factory.mktemp("net") / "random_inception.pth"))


def save_edited(ckpt, path):
    """Save a checkpoint edited by hand, as another tool (or an older version of this one) writes it: without the
    digest this tool's writer adds, which the edit would no longer match."""
    torch.save({key: value for key, value in ckpt.items() if key != "sha256"}, path)


def run_in_process(argv, capsys):
    """ddpm_main.main(argv) → (exit status, stderr)."""
    import ddpm_main
    with pytest.raises(SystemExit) as exit_info:
        ddpm_main.main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def diffusion():
    return Diffusion(100, cosine_beta_schedule)


class ClassShift(nn.Module):
    """ε = x · 0.1 + label (null label: 10), so guided combinations are easy to read."""
    num_classes = 10

    def forward(self, x, t, class_labels=None):
        labels = torch.full_like(t, 10) if class_labels is None else class_labels
        return x * 0.1 + labels.float().view(-1, 1, 1, 1)


def tiny_unet(seed=0, **kwargs):
    torch.manual_seed(seed)
    return UNet(UNetConfig(**{"dim": 8, "dim_mults": (1, 2), "num_classes": 10, **kwargs}))


def card_holding(images, tried):
    """Diffusion.sample on a device with room for `images` at a time: larger batches raise out of memory; every batch
    size asked for is appended to `tried`."""
    real_sample = Diffusion.sample

    def sample(self, model, shape, *args, **kwargs):
        tried.append(shape[0])
        if shape[0] > images:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_sample(self, model, shape, *args, **kwargs)
    return sample


# google/ddpm-cifar10-32's config.json (the Hugging Face hub), the paper's 35.7M-parameter network
GOOGLE_CONFIG = {"act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
                 "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                                    "DownBlock2D"],
                 "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
                 "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
                 "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
                 "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


# the same layout, narrower, for the tests that need not pay for 35.7M parameters
SMALL_CONFIG = {**GOOGLE_CONFIG, "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8}


def random_unet(config, seed=0):
    """A UNet2DModel with random weights, its GroupNorms' scales and shifts too (they start at 1 and 0)."""
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    unet = UNet2DModel(**config).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return unet


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small") / "small-unet"
    unet = random_unet(SMALL_CONFIG, seed=1)
    unet.save_pretrained(folder)
    return folder, unet
