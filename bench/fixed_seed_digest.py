"""A digest of everything a set of fixed-seed CLI runs writes and says, to prove that a change of layout changes no
behaviour: run it before and after, and diff the two outputs.

    python bench/fixed_seed_digest.py > before.txt   # on the old code
    python bench/fixed_seed_digest.py > after.txt    # on the new
    diff before.txt after.txt

It builds a tiny image folder and a stand-in FID network (torch-fidelity's, random weights), then runs ddpm_main.py
(a new process each, as a user would) for training (conditional with evaluation and best.pt; unconditional with
FID), a resume, inference (class lists, the three samplers, a guidance sweep, FID) and bad inputs, after --help.
It prints, per command, the exit status and what it said, and per file written a SHA-256: JSON, checkpoints and npz
files without their timings, versions and network hash (which differ from run to run), their dicts in key order
and a config's network settings read from its model entry alone (so that the config's layout is not its content),
every other file as its bytes. Timings in messages ("1.2 s", "350 img/s") are masked. CPU, float32: about two minutes on 2 cores.
"""
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ddpm_fid import write_random_inception  # noqa: E402

TINY = ["--dim", "8", "--dim_mults", "1,2", "--timesteps", "10", "--batch_size", "8", "--no_cuda", "--precision",
        "fp32", "--data_dir", "data"]  # what every training command adds
MACHINE = ["--no_cuda", "--precision", "fp32", "--data_dir", "data"]  # what every --inference command adds
PAPER_LAYOUT = ["--architecture", "ddpm", "--resblock", "add", "--groups", "4"]  # a network --export_diffusers takes
VARYING = {"timing", "versions", "train_images_per_s", "fid_s", "seconds", "seconds_per_image",  # entries that differ
           # between identical runs
           "file",  # the absolute path of an imported checkpoint's source, in the digest's own temporary folder
           "network", "network_sha256",  # the stand-in network file's SHA-256: torch.save writes other bytes each time
           "sha256"}  # a checkpoint's digest of its contents, timings included
TIMES = re.compile(r"\d+(\.\d+)? ?(s|img/s|min)\b")


def make_folder(root, classes=4, per_class=(6, 2), size=16):
    """train/<class>/*.png, test/<class>/*.png: noisy images around a colour per class."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"))
            for i in range(count):
                pixels = np.clip(rng.integers(0, 255, 3) + rng.normal(0, 30, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, split, f"class{c}", f"{i}.png"))


COMMANDS = [
    ["--help"],
    ["--epochs", "2", "--conditional", "--save_model", "--run_name", "cond", "--log_interval", "1"],
    ["--epochs", "1", "--save_model", "--run_name", "uncond", "--eval_fid", "16", "--fid_inception", "net.pth"],
    ["--epochs", "1", "--run_name", "refstats", "--eval_fid", "10", "--fid_inception", "net.pth", "--fid_ref_stats",
     "data/ddpm_fid_train_stats.npz", "--eval_every", "2"],
    ["--epochs", "1", "--run_name", "resumed", "--conditional", "--lr_decay", "cosine"],
    ["--resume", "auto", "--run_name", "resumed", "--epochs", "2", "--conditional", "--lr", "0.001"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--conditional", "--num_samples", "10",
     "--sample_classes", "class1,2"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--num_samples", "6", "--run_name", "null_label"],
    ["--inference", "--model_path", "models/cond/best.pt", "--conditional", "--num_samples", "5", "--sampler", "ddim",
     "--eta", "0.5", "--run_name", "ddim"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--conditional", "--num_samples", "4", "--sampler", "ddpm",
     "--run_name", "ddpm"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--guidance_sweep", "0,1,3", "--run_name", "sweep"],
    ["--inference", "--model_path", "models/uncond/ckpt.pt", "--num_samples", "8", "--eval_fid", "12",
     "--fid_inception", "net.pth", "--seed", "3"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--conditional", "--denoising_strip", "--run_name", "strip"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--conditional", "--eval_nll", "4", "--run_name", "nll"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--conditional", "--inpaint", "centre", "--num_samples",
     "3", "--run_name", "inpaint"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--invert", "--images", "0,5", "--run_name", "invert"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--conditional", "--interpolate", "1,seed:4",
     "--sample_classes", "2", "--frames", "3", "--run_name", "interpolate"],
    ["--epochs", "1", "--save_model", "--run_name", "paper", *PAPER_LAYOUT, "--data_dir", "data32"],
    ["--model_path", "models/paper/ckpt.pt", "--export_diffusers", "exported"],
    ["--import_weights", "exported", "--run_name", "imported", "--sampler", "ddim", "--sampling_steps", "4"],
    ["--inference", "--model_path", "models/imported/ckpt.pt", "--num_samples", "2"],
    # bad input: exit status 2 and one line, nothing written
    ["--epochs", "0"],
    ["--inference"],
    ["--inference", "--model_path", "missing.pt"],
    ["--inference", "--model_path", "net.pth"],
    ["--inference", "--model_path", "models/uncond/ckpt.pt", "--conditional"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--conditional", "--sample_classes", "horse"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--sampling_steps", "50"],
    ["--resume", "auto", "--run_name", "nothing_here"],
    ["--resume", "auto", "--run_name", "resumed", "--dim", "16"],
    ["--run_name", "../escape"],
    ["--fid_inception", "net.pth"],
    ["--sampler", "ddpm", "--sampling_steps", "5"],
    ["--guidance_sweep", "1,2"],
    ["--dim_mults", "1,2,2,2,2,2"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--inpaint", "centre", "--sampler", "ddpm"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--invert", "--eval_nll", "2"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--jump_length", "2"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--interpolate", "1,2", "--num_samples", "2"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--invert", "--images", "0,missing.png"],
    ["--inference", "--model_path", "models/cond/ckpt.pt", "--inpaint", "circle"],
    ["--import_weights", "exported", "--inference"],
    ["--export_diffusers", "elsewhere"],
    ["--model_path", "models/cond/ckpt.pt", "--export_diffusers", "other"],
]


# The network's settings, which configs written before 2026-12-06 kept at the top level as well as in their model
# entry: a copy left out, so that a digest compares what the config says and not where it says it.
NETWORK_COPIES = ("architecture", "dim", "dim_mults", "num_res_blocks", "attn_resolutions", "dropout", "resblock",
                  "groups", "norm_eps")


def without_varying(content):
    """Content without the VARYING entries, at any depth, dicts in key order, and a config's network settings only in
    its model entry (NETWORK_COPIES)."""
    if isinstance(content, dict):
        is_config = isinstance(content.get("model"), dict) and "timesteps" in content
        return {k: without_varying(content[k]) for k in sorted(content)
                if k not in VARYING and not (is_config and k in NETWORK_COPIES)}
    return content


def digest_file(path):
    """SHA-256 of a file, of its content without VARYING entries for JSON and checkpoints."""
    if path.endswith(".json"):
        content = without_varying(json.load(open(path)))
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    if path.endswith(".pt"):
        ckpt = torch.load(path, weights_only=True)
        buffer = io.BytesIO()
        torch.save(without_varying(ckpt), buffer)
        return hashlib.sha256(buffer.getvalue()).hexdigest()[:16]
    if path.endswith(".npz"):
        arrays = np.load(path)
        content = b"".join(name.encode() + arrays[name].tobytes() for name in sorted(arrays) if name not in VARYING)
        return hashlib.sha256(content).hexdigest()[:16]
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]


def common_flags(command):
    """The flags a command runs with besides its own: the tiny network's for training, the machine's for inference,
    none for --import_weights and --export_diffusers (their jobs take neither)."""
    if "--import_weights" in command or "--export_diffusers" in command:
        return []
    return MACHINE if "--inference" in command else TINY


def main():
    work = tempfile.mkdtemp(prefix="ddpm_digest_")
    make_folder(os.path.join(work, "data"))
    make_folder(os.path.join(work, "data32"), size=32)  # CIFAR-10's side: what --import_weights takes
    write_random_inception(os.path.join(work, "net.pth"))
    env = {**os.environ, "TORCH_HOME": os.path.join(work, "torch_home")}  # never the user's download cache
    seen = {}
    for command in COMMANDS:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "ddpm_main.py"), *common_flags(command), *command],
                                cwd=work,
                                capture_output=True, text=True, timeout=600, env=env)
        print(f"$ {' '.join(command)}\nexit {result.returncode}")
        for stream, text in (("out", result.stdout), ("err", result.stderr)):
            for line in text.splitlines():
                print(f"  {stream}: {TIMES.sub('#', line)}")
        for folder, _, names in sorted(os.walk(work)):
            for name in sorted(names):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, work)
                if relative == "net.pth" or relative.startswith("data") and relative.endswith(".png"):
                    continue  # made above
                digest = digest_file(path)
                if seen.get(relative) != digest:
                    print(f"  wrote {relative} {digest}")
                    seen[relative] = digest
        sys.stdout.flush()


if __name__ == "__main__":
    main()
