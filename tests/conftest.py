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
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MAIN = os.path.join(ROOT, "ddpm_main.py")
from ddpm_fid import write_random_inception  # noqa: E402
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
    import torch
    torch.save({key: value for key, value in ckpt.items() if key != "sha256"}, path)
