"""What each preset's network costs on this machine: its parameters, the forward pass's GFLOP per image (torch's FLOP
counter: two per multiply-add, convolutions, attention and linear layers) and training images per second (the CLI's
TrainingStep: the preset's batch size and Adam, the precision --precision resolves to, device-resident random images).

    python bench/preset_cost.py                        # every preset, 3 timed steps after 1 untimed
    python bench/preset_cost.py --presets ddpm_cifar10 --steps 5 --out outputs/preset_cost.json

Prints a line per preset and writes JSON (--out).
"""
import argparse
import copy
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_presets import preset_network
from ddpm_data import DeviceLoader  # noqa: E402
from ddpm_diffusion import Diffusion, make_schedule  # noqa: E402
from ddpm_model import build_unet  # noqa: E402
from ddpm_presets import PRESETS  # noqa: E402
from ddpm_runtime import PRECISIONS, Denoiser, choose_precision, synchronize  # noqa: E402
from ddpm_train_step import TrainingStep, build_loss_scaler, build_optimizer  # noqa: E402


def forward_gflop(model, side, channels):
    """GFLOP of one image's forward pass."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, side, side), torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops() / 1e9


def training_images_per_s(model, recipe, device, precision, steps, warmup):
    """Images per second of the CLI's training step (Adam, EMA, clipping) at the recipe's batch size."""
    model = model.to(device, memory_format=torch.channels_last)
    batch = recipe.get("batch_size", 64)
    images = torch.randint(0, 256, (batch * (steps + warmup), 3, 32, 32), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.zeros(len(images), dtype=torch.long), batch, device)
    diffusion = Diffusion(recipe.get("timesteps", 100), lambda T: make_schedule(recipe.get("schedule", "cosine"), T),
                          device)
    step = TrainingStep(model, copy.deepcopy(model).requires_grad_(False), build_optimizer(
        model, recipe.get("lr", 3e-3), recipe.get("weight_decay", 0.01)), diffusion, Denoiser(model, False, precision),
        p_uncond=0.0, loss_type="l2", ema_decay=recipe.get("ema_decay", 0.999), scaler=build_loss_scaler(precision,
                                                                                                         device))
    for i, (x, y) in enumerate(loader.batches()):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        step(x, y, i, recipe.get("lr", 3e-3))[0].item()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per preset")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="as ddpm_main.py's --precision")
    p.add_argument("--out", default="outputs/preset_cost.json", help="where the JSON goes")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, why = choose_precision(a.precision, device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
               "torch": torch.__version__, "precision": precision, "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["python"] + sys.argv), "presets": {}}
    for name in a.presets.split(","):
        recipe = PRESETS[name][1]
        torch.manual_seed(0)
        model = build_unet(preset_network(name))
        row = {"parameters": sum(p.numel() for p in model.parameters()),
               "forward_gflop_per_image": forward_gflop(model, 32, 3), "batch_size": recipe.get("batch_size", 64),
               "train_images_per_s": training_images_per_s(model, recipe, device, precision, a.steps, a.warmup)}
        results["presets"][name] = row
        print(f"{name}: {row['parameters']:,} parameters, {row['forward_gflop_per_image']:.2f} GFLOP per image "
              f"forward, {row['train_images_per_s']:.1f} training img/s at batch {row['batch_size']} on {device} in "
              f"{precision} ({why})", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
