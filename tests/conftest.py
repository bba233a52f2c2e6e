"""Shared fixtures: tiny image-folder datasets generated on the fly (never the real CIFAR-10)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MAIN = os.path.join(ROOT, "ddpm_main.py")
TINY_MODEL = ["--dim", "8", "--dim_mults", "1,2", "--timesteps", "10", "--batch_size", "8", "--no_cuda"]


def make_image_folder(root, per_class_train=3, per_class_test=1, num_classes=10, size=16, seed=0):
    """train/<class>/*.png and test/<class>/*.png of random images; each class has its own mean colour."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        for c in range(num_classes):
            folder = os.path.join(root, split, f"{c}_class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                base = rng.integers(0, 255, 3)
                pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("tiny_data")))


def run_cli(*args, cwd, timeout=300, env=None):
    """Run ddpm_main.py as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, MAIN, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory):
    """One conditional and one unconditional 1-epoch run (models/cond, models/uncond), shared by tests."""
    cwd = tmp_path_factory.mktemp("runs")
    for name, extra in (("cond", ["--conditional", "--p_uncond", "0.2"]), ("uncond", [])):
        result = run_cli("--data_dir", tiny_data, "--epochs", "1", "--save_model", "--run_name", name,
                         *TINY_MODEL, *extra, cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    return cwd
