"""What the checkpoint digest costs: SHA-256 of every tensor and value (ddpm_checkpoint.checkpoint_digest), against
writing and reading the same checkpoint, for the shipped model and for a last.pt of Ho et al.'s 35.7M-parameter
network (weights, EMA and AdamW's two moments).

    python bench/digest_cost.py
"""
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_checkpoint import checkpoint_digest, load_checkpoint, write_checkpoint  # noqa: E402
from ddpm_presets import preset_network  # noqa: E402
from ddpm_model import build_unet  # noqa: E402

SHIPPED = "models/cifar10_cond_speedrun/ckpt.pt"


def paper_last_pt():
    """A last.pt-shaped dict of the ddpm_cifar10 preset's network: weights, EMA, AdamW moments (float32)."""
    model = build_unet(preset_network("ddpm_cifar10"))
    weights = {name: w.detach().clone() for name, w in model.state_dict().items()}
    moments = {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
               for i, p in enumerate(model.parameters())}
    return {"format": "ddpm-cifar10", "model": weights, "ema": {k: v.clone() for k, v in weights.items()},
            "optimizer": {"state": moments, "param_groups": [{"lr": 2e-4, "params": list(range(len(moments)))}]}}


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name, ckpt, folder):
    path = os.path.join(folder, f"{name}.pt")
    tensors = sum(v.numel() * v.element_size() for part in ("model", "ema") for v in (ckpt.get(part) or {}).values())
    tensors += sum(m.numel() * m.element_size() for s in ckpt.get("optimizer", {}).get("state", {}).values()
                   for m in s.values())
    digest_s = best_of(lambda: checkpoint_digest(ckpt))
    write_s = best_of(lambda: write_checkpoint(ckpt, path))
    read_s = best_of(lambda: torch.load(path, weights_only=True))
    print(f"| {name} | {tensors / 1e6:.0f} MB | {digest_s:.3f} s | {write_s:.3f} s | {read_s:.3f} s | "
          f"{100 * digest_s / max(read_s, 1e-9):.0f} % |")


def main():
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| checkpoint | tensor bytes | digest | write (with digest) | torch.load | digest / load |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        measure("shipped ckpt.pt (1.5M, bf16 EMA)", torch.load(SHIPPED, weights_only=True), folder)
        measure("ddpm_cifar10 last.pt (35.7M)", paper_last_pt(), folder)
        start = time.perf_counter()
        load_checkpoint(SHIPPED)
        print(f"load_checkpoint of the shipped model, every check and the digest: {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
