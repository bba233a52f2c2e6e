"""Named recipes: bundles of flag values that `--preset NAME` sets (flags given beside it override them). One home for
each recipe: --help and docs/flags.md (ddpm_config) list them from here, and bench/speedrun.py trains with its own.

Values are the flags' values, as argparse would parse them (lists for the comma-separated flags).
"""
from ddpm_model import UNetConfig

# Ho et al. 2020, CIFAR-10 (§4, Appendix B, and their released code): the 35.7M-parameter U-Net, T = 1000 with the
# linear β from 1e-4 to 0.02, ε-prediction with L_simple, Adam (no weight decay) at 2e-4 after 5,000 warm-up steps,
# batch 128, EMA 0.9999, gradient norm clipped at 1 (always, ddpm_train_step.GRAD_CLIP_NORM), random horizontal flips
# (always). 800k steps: 2,273 epochs of the 352 batches of 128 in the tool's 45,000 training images (the paper
# trains on all 50,000). GroupNorm's ε is their code's 1e-6. Samples by all T ancestral steps with σ_t² = β_t, as
# their CIFAR-10 samples were drawn (the paper finds β_t and β̃_t alike, §3.2).
DDPM_CIFAR10 = {
    "architecture": "ddpm", "dim": 128, "dim_mults": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16],
    "dropout": 0.1, "resblock": "add", "groups": 32, "norm_eps": 1e-6,
    "timesteps": 1000, "schedule": "linear", "prediction": "eps", "loss_type": "l2",
    "lr": 2e-4, "warmup_steps": 5000, "weight_decay": 0, "lr_decay": "none", "batch_size": 128,
    "ema_decay": 0.9999, "epochs": 2273, "sampler": "ddpm", "variance": "beta", "eval_every": 50,
}

# bench/speedrun.py's recipe for a 5-minute GPU run (a starting point, not yet tuned on a GPU: BENCHMARKS.md); the
# speedrun adds --conditional, --time_budget_min and a guidance scale.
SPEEDRUN = {
    "dim": 48, "dim_mults": [1, 2, 2], "batch_size": 500, "lr": 2e-3, "warmup_steps": 300, "ema_decay": 0.9995,
    "timesteps": 1000, "schedule": "cosine", "eval_every": 1000, "checkpoint_every": 1000,
}

# The recipe study's best (BENCHMARKS.md, "Quality per minute"; bench/recipe_study.py's row lr_2e-3_attn_8_batch_32):
# the shipped model's recipe with lr 2e-3 (not 1e-3), attention only at 8×8 (not 16×16 and 8×8) and batch 32 (not
# 64). 20 minutes of bf16 steps on 2 CPU cores read FID-1k 64.9, against 82.9 for the recipe unchanged (measured when
# the budget counted training steps only; it now counts the whole run). The lr decays over the time the budget leaves
# for training; --conditional and a longer --time_budget_min go beside it.
CPU = {
    "dim": 48, "dim_mults": [1, 2, 2], "attn_resolutions": [8], "batch_size": 32, "lr": 2e-3, "warmup_steps": 200,
    "lr_decay": "cosine", "ema_decay": 0.999, "timesteps": 1000, "schedule": "cosine",
    "epochs": 1000, "time_budget_min": 20,
}

PRESETS = {
    "ddpm_cifar10": ("Ho et al. 2020's CIFAR-10 network and training (35,746,307 parameters, 800k steps)",
                     DDPM_CIFAR10),
    "speedrun": ("bench/speedrun.py's 5-minute GPU recipe (3.1M parameters)", SPEEDRUN),
    "cpu": ("the recipe study's best for CPU runs: a 20-minute run (3.0M parameters)", CPU),
}


def preset_network(name, image_size=32, channels=3, num_classes=None):
    """The UNetConfig of a preset's network for images of image_size: its flags over UNetConfig's defaults (which
    are the flags' defaults)."""
    flags = PRESETS[name][1]
    fields = {key: flags[key] for key in UNetConfig.__dataclass_fields__ if key in flags}
    return UNetConfig.from_dict({**fields, "image_size": image_size, "channels": channels, "num_classes": num_classes})
