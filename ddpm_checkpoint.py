"""The checkpoint format, in one place: the run's config, where training stands, and how a checkpoint is
built, saved, loaded, restored and exported.

A checkpoint is one dict that loads with torch.load(path, weights_only=True):

    format, version    "ddpm-cifar10", 1: what wrote it
    config             the resolved config (training_config): model and diffusion are rebuilt from it alone, and
                       its 'sampling' entry says how to sample them (SamplerSettings)
    versions           the tool's, torch's and Python's versions
    model, ema         state dicts of the trained weights and of their exponential moving average
    optimizer          AdamW's state (last.pt and ckpt.pt; best.pt and exports leave it out)
    rng                the CPU (and CUDA) generator states, for an exact resume
    grad_scaler        fp16's loss-scaler state (None when the run trained in bf16 or fp32)
    epoch, step, batch_in_epoch, epoch_loss_sum, best_val, skipped_steps, history, timing    the TrainingState

An export for inference (export_for_inference) keeps format, version, config, versions and the EMA weights in bf16.
"""
import dataclasses
import math
import os
import platform
from dataclasses import dataclass, field

import torch

from ddpm_data import CIFAR10_CLASSES, model_side
from ddpm_diffusion import Diffusion, SamplerSettings, make_schedule
from ddpm_helpers import NonFiniteError, UserError, atomic_torch_save, write_json
from ddpm_model import UNet, UNetConfig

CHECKPOINT_FORMAT = "ddpm-cifar10"
CHECKPOINT_VERSION = 1
TOOL_VERSION = "0.1.0"

# The config's keys, in five kinds. A test checks that every key is in exactly one of them.
# Fixed settings: what the run trains (model, diffusion, objective, batches, seed). A new run takes them from the
# flags of the same name; a resumed run from its checkpoint, and a flag given with another value is an error.
FIXED_SETTINGS = ("conditional", "timesteps", "schedule", "loss_type", "prediction", "min_snr_gamma", "dim",
                  "dim_mults", "batch_size", "grad_accum", "p_uncond", "ema_decay", "seed")
# Adjustable settings: how long and how fast it trains. A resumed run takes a flag given, else its checkpoint's value.
# precision is the --precision asked for ('auto' is resolved anew on each run's hardware:
# ddpm_helpers.choose_precision).
ADJUSTABLE_SETTINGS = ("lr", "lr_decay", "warmup_steps", "epochs", "time_budget_min", "precision")
# Run settings: every run, resumed or not, takes them from its own command line (and torchrun).
RUN_SETTINGS = ("run_name", "data_dir", "world_size")
# Sampling settings: how the model is to be sampled (SamplerSettings as a dict): the run's sampling flags, else the
# resumed checkpoint's, else the defaults. Inference takes them from the checkpoint unless its flags say otherwise.
SAMPLING_SETTINGS = ("sampling",)
# Derived: what follows from the settings above and the data (data_facts): what the data is, its class names, channels
# and image size [H, W], and the side of the square the model works on (image_size: data_size padded to fit the
# stages, ddpm_data.model_side).
DERIVED_KEYS = ("model", "num_classes", "dataset", "classes", "channels", "data_size", "image_size", "num_train",
                "num_val", "num_test", "global_batch_size")

TIMING_KEYS = ("decode_s", "compile_s", "train_s", "eval_s", "sample_s")


def training_config(flags, data_facts, saved_config=None, given=()):
    """The resolved config of a training run, saved in every checkpoint and in config.json.

    flags: the command line's values by config key (every setting above), and 'sampling': the resolved
    SamplerSettings; data_facts: ddpm_data.data_facts and num_train, num_val, num_test. saved_config: the checkpoint's
    config when resuming, whose fixed settings win over the flags, and whose adjustable ones win over flags not
    `given` on the command line (a key it lacks, from an older version, falls back to the flag)."""
    chosen = {key: flags[key] for key in FIXED_SETTINGS + ADJUSTABLE_SETTINGS + RUN_SETTINGS}
    if saved_config is not None:
        kept = FIXED_SETTINGS + tuple(key for key in ADJUSTABLE_SETTINGS if key not in given)
        chosen.update({key: saved_config.get(key, chosen[key]) for key in kept})
    classes = list(data_facts["classes"])
    model = UNetConfig(dim=chosen["dim"], dim_mults=tuple(chosen["dim_mults"]), channels=data_facts["channels"],
                       num_classes=len(classes) if chosen["conditional"] else None)
    return {
        "model": model.to_dict(), "conditional": chosen["conditional"], "num_classes": model.num_classes,
        "dataset": data_facts["dataset"], "classes": classes, "channels": data_facts["channels"],
        "data_size": list(data_facts["data_size"]),
        "image_size": model_side(data_facts["data_size"], len(chosen["dim_mults"])), "timesteps": chosen["timesteps"],
        "schedule": chosen["schedule"], "loss_type": chosen["loss_type"], "prediction": chosen["prediction"],
        "min_snr_gamma": chosen["min_snr_gamma"], "lr_decay": chosen["lr_decay"], "dim": chosen["dim"],
        "dim_mults": list(chosen["dim_mults"]), "lr": chosen["lr"], "warmup_steps": chosen["warmup_steps"],
        "batch_size": chosen["batch_size"], "grad_accum": chosen["grad_accum"], "epochs": chosen["epochs"],
        "p_uncond": chosen["p_uncond"], "ema_decay": chosen["ema_decay"], "seed": chosen["seed"],
        "run_name": chosen["run_name"],
        "data_dir": chosen["data_dir"], "num_train": data_facts["num_train"], "num_val": data_facts["num_val"],
        "num_test": data_facts["num_test"], "time_budget_min": chosen["time_budget_min"],
        "world_size": chosen["world_size"], "precision": chosen["precision"],
        "global_batch_size": chosen["batch_size"] * chosen["grad_accum"] * chosen["world_size"],
        "sampling": dataclasses.asdict(flags["sampling"]),
    }


def fixed_setting_conflicts(saved_config, flags, given):
    """The fixed settings given on a resume's command line with values other than the checkpoint's:
    {key: (checkpoint's value, flag's value)}."""
    return {key: (saved_config[key], flags[key]) for key in FIXED_SETTINGS
            if key in given and key in saved_config and flags[key] != saved_config[key]}


def trained_data(config):
    """The data facts (ddpm_data.data_facts) of what a config's model was trained on. Checkpoints from before they
    were stored held square colour images: CIFAR-10 when the class names are CIFAR-10's, else a folder."""
    classes, side = config.get("classes") or [], config["image_size"]
    return {"dataset": config.get("dataset") or ("cifar10" if classes == CIFAR10_CLASSES else "folder"),
            "classes": classes, "channels": config["model"].get("channels", 3),
            "data_size": config.get("data_size") or [side, side]}


def data_conflicts(saved_config, facts):
    """How the data a resumed run reads differs from what its checkpoint was trained on: {what: (checkpoint's,
    data's)} over the class names, the channels and the image size."""
    saved = trained_data(saved_config)
    return {key: (saved[key], facts[key]) for key in ("classes", "channels", "data_size") if saved[key] != facts[key]}


def resume_changes(saved_config, config):
    """The adjustable and sampling settings a resumed run changes: {key: (checkpoint's value, new value)}."""
    return {key: (saved_config.get(key), config[key]) for key in ADJUSTABLE_SETTINGS + SAMPLING_SETTINGS
            if saved_config.get(key) != config[key]}


def saved_sampler_settings(config):
    """The SamplerSettings a checkpoint's config carries; None for checkpoints written before they did."""
    return SamplerSettings(**config["sampling"]) if "sampling" in config else None


def build_model(config):
    """The U-Net the config describes, with freshly initialised weights."""
    return UNet(UNetConfig.from_dict(config["model"]))


def build_diffusion(config, device):
    """The diffusion process the config describes: T, the β schedule, the prediction target, Min-SNR-γ."""
    return Diffusion(config["timesteps"], lambda T: make_schedule(config["schedule"], T), device,
                     prediction=config.get("prediction", "eps"), min_snr_gamma=config.get("min_snr_gamma"))


def environment_versions():
    return {"tool": TOOL_VERSION, "torch": str(torch.__version__), "python": platform.python_version()}


def checkpoint_header(config):
    """What every checkpoint of this tool starts with: format, version, config and versions."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
            "versions": environment_versions()}


def write_config_json(config, path):
    """config.json beside the checkpoints: the resolved config and the versions, for people and other tools."""
    write_json({**config, "versions": environment_versions()}, path)


@dataclass
class TrainingState:
    """Where training stands: what a checkpoint holds besides the config, weights, optimizer and RNG."""
    epoch: int = 0                 # epochs finished
    step: int = 0                  # optimizer steps taken
    batch_in_epoch: int = 0        # batches done in the current epoch (non-zero after a mid-epoch save)
    epoch_loss_sum: float = 0.0    # the sum of those batches' losses
    best_val: float = math.inf     # the lowest validation loss so far (best.pt)
    skipped_steps: int = 0         # fp16 steps the loss scaler skipped because their gradients overflowed
    history: dict = field(default_factory=lambda: {"train_loss": [], "val_loss": [], "test_loss": [], "epochs": []})
    timing: dict = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))  # seconds per activity

    @classmethod
    def from_checkpoint(cls, ckpt):
        position = {key: ckpt[key] for key in ("epoch", "step", "batch_in_epoch", "epoch_loss_sum", "best_val")}
        return cls(**position, skipped_steps=ckpt.get("skipped_steps", 0), history=ckpt["history"],
                   timing={key: ckpt["timing"].get(key, 0.0) for key in TIMING_KEYS})

    def record_evaluation(self, epoch, train_loss, val_loss, test_loss):
        """Append an evaluated epoch to the history; True when its validation loss is the best so far."""
        for key, value in (("train_loss", train_loss), ("val_loss", val_loss), ("test_loss", test_loss),
                           ("epochs", epoch)):
            self.history[key].append(value)
        is_best = val_loss < self.best_val
        self.best_val = min(self.best_val, val_loss)
        return is_best

    def finish_epoch(self, epoch):
        self.epoch, self.batch_in_epoch, self.epoch_loss_sum = epoch, 0, 0.0


def build_checkpoint(config, model, ema_model, optimizer, state, use_cuda, scaler=None):
    """The checkpoint dict of a training run at this moment (see the module docstring); scaler: fp16's
    GradScaler, or None."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if use_cuda else []}
    return {**checkpoint_header(config), "model": model.state_dict(), "ema": ema_model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng,
            "grad_scaler": scaler.state_dict() if scaler is not None else None, **dataclasses.asdict(state)}


def nonfinite_weights(ckpt, parts=("model", "ema")):
    """Names of the checkpoint's weight tensors (of `parts`) that hold NaN or infinite values."""
    return [f"{part}.{name}" for part in parts for name, w in (ckpt.get(part) or {}).items()
            if w.is_floating_point() and not torch.isfinite(w).all()]


def require_finite_weights(ckpt):
    """NonFiniteError, naming them, when weight tensors of the checkpoint hold NaN or infinite values."""
    broken = nonfinite_weights(ckpt)
    if broken:
        raise NonFiniteError(f"the weights hold NaN or infinite values ({', '.join(broken[:2])}"
                             f"{', …' if len(broken) > 2 else ''})")


def save_checkpoint(ckpt, path, with_optimizer=True):
    """Write atomically (a crash never leaves a half-written file); best.pt goes without the optimizer. Weights
    that are NaN or infinite are never written: NonFiniteError."""
    require_finite_weights(ckpt)
    atomic_torch_save(ckpt if with_optimizer else {k: v for k, v in ckpt.items() if k != "optimizer"}, path)


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
    refuse_nonfinite(ckpt, path, ("ema",) if ckpt.get("ema") else ("model",))  # the weights it samples with
    return ckpt


def refuse_nonfinite(ckpt, path, parts):
    """UserError when the checkpoint's weights of `parts` hold NaN or infinite values."""
    if nonfinite_weights(ckpt, parts):
        raise UserError(f"{path!r} holds NaN or infinite weights (written by a run that diverged); "
                        "use an earlier checkpoint")


def resumable_runs(models_dir):
    """A phrase naming the runs under models_dir that hold a last.pt."""
    names = sorted(name for name in (os.listdir(models_dir) if os.path.isdir(models_dir) else [])
                   if os.path.isfile(os.path.join(models_dir, name, "last.pt")))
    return f"runs with a last.pt in {models_dir}: {', '.join(names)}" if names else f"{models_dir} holds no last.pt"


def load_resumable(resume, models_dir, run_name):
    """(path, checkpoint) of the last.pt --resume names ('auto': <models_dir>/<run_name>/last.pt); it must hold the
    optimizer."""
    path = resume
    if path == "auto":
        path = os.path.join(models_dir, run_name, "last.pt")
        if not os.path.isfile(path):
            raise UserError(f"--resume auto looked for {path} and found nothing to resume. A run writes last.pt "
                            "after its first --checkpoint_minutes of training or its first epoch, and on Ctrl-C or "
                            "SIGTERM, so a run stopped sooner left none; or it ran under another --run_name or "
                            f"--models_dir ({resumable_runs(models_dir)})")
    elif not os.path.isfile(path):
        raise UserError(f"--resume {path!r} does not exist")
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt:
        raise UserError(f"--resume {path!r} holds weights only (no optimizer state); resume from last.pt")
    refuse_nonfinite(ckpt, path, ("model", "ema"))
    return path, ckpt


def restore_training(ckpt, model, ema_model, optimizer, use_cuda, scaler=None):
    """Put a checkpoint's weights, EMA, optimizer state and RNG states back, and fp16's loss scale when both the
    checkpoint and this run have one (a run that changes precision on resume starts the scaler afresh); returns its
    TrainingState."""
    model.load_state_dict(ckpt["model"])
    ema_model.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("grad_scaler"):
        scaler.load_state_dict(ckpt["grad_scaler"])
    state = TrainingState.from_checkpoint(ckpt)
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if use_cuda and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return state


def export_for_inference(ckpt, path):
    """Write a small inference-only checkpoint: config and EMA weights in bf16 (no optimizer, no raw weights).
    The training machine's data folder means nothing elsewhere: the config's data_dir becomes the default."""
    weights = ckpt.get("ema") or ckpt["model"]
    small = {**checkpoint_header({**ckpt["config"], "data_dir": "./data"}),
             "ema": {k: v.to(torch.bfloat16) for k, v in weights.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_torch_save(small, path)


def sampling_model(ckpt):
    """The checkpoint's U-Net with its EMA weights (the raw weights if it has none), for sampling."""
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt.get("ema") or ckpt["model"])
    return model
