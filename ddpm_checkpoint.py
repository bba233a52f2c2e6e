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
    epoch, step, batch_in_epoch, epoch_loss_sum, best_val, skipped_steps, history, timing, budget_spent
                       the TrainingState

An export for inference (export_for_inference) keeps format, version, config, versions and the EMA weights in bf16.
An imported network (imported_checkpoint) has format, version, config, versions, its weights as 'ema' in float32, and
imported_from: the file it was made from and that file's SHA-256.

Every checkpoint is checked for what it must hold before it is used (checkpoint_problem: the config's entries, weights
of the shapes its network has, and for a resume the optimizer, RNG and position), and what a config needs in memory is
estimated before anything is built (memory_needs).
"""
import dataclasses
import math
import os
import platform
import sys
from dataclasses import dataclass, field

import torch

from ddpm_data import CIFAR10_CLASSES, model_side
from ddpm_download import file_digest
from ddpm_diffusion import LOSS_TYPES, PREDICTIONS, SCHEDULES, Diffusion, SamplerSettings, make_schedule
from ddpm_helpers import (PRECISIONS, RUN_NAME_CHARACTERS, NonFiniteError, UserError, atomic_torch_save, check_memory,
                          sanitized_run_name, write_json)
from ddpm_model import ARCHITECTURES, RESBLOCKS, UNetConfig, build_unet
from ddpm_train import LR_DECAYS, WALL_PARTS

CHECKPOINT_FORMAT = "ddpm-cifar10"
CHECKPOINT_VERSION = 1
TOOL_VERSION = "0.1.0"

# The config's keys, in five kinds. A test checks that every key is in exactly one of them.
# Fixed settings: what the run trains (model, diffusion, objective, batches, seed). A new run takes them from the
# flags of the same name; a resumed run from its checkpoint, and a flag given with another value is an error.
# The network's (MODEL_SETTINGS) are also the config's model entry (UNetConfig); a resume takes them from there.
MODEL_SETTINGS = ("architecture", "dim", "dim_mults", "num_res_blocks", "attn_resolutions", "dropout", "resblock",
                  "groups", "norm_eps")
FIXED_SETTINGS = ("conditional", "timesteps", "schedule", "loss_type", "prediction", "min_snr_gamma",
                  *MODEL_SETTINGS, "batch_size", "grad_accum", "p_uncond", "ema_decay", "seed")
# Adjustable settings: how long and how fast it trains. A resumed run takes a flag given, else its checkpoint's value.
# precision is the --precision asked for ('auto' is resolved anew on each run's hardware:
# ddpm_helpers.choose_precision).
ADJUSTABLE_SETTINGS = ("lr", "lr_decay", "warmup_steps", "weight_decay", "epochs", "time_budget_min", "precision")
# Run settings: every run, resumed or not, takes them from its own command line (and torchrun).
RUN_SETTINGS = ("run_name", "data_dir", "world_size")
# Sampling settings: how the model is to be sampled (SamplerSettings as a dict): the run's sampling flags, else the
# resumed checkpoint's, else the defaults. Inference takes them from the checkpoint unless its flags say otherwise.
SAMPLING_SETTINGS = ("sampling",)
# What training_config takes from the command line (RUN_SETTINGS' data_dir as resolved by the run).
COMMAND_LINE_SETTINGS = FIXED_SETTINGS + ADJUSTABLE_SETTINGS + RUN_SETTINGS
# Derived: what follows from the settings above and the data (data_facts): what the data is, its class names, channels
# and image size [H, W], and the side of the square the model works on (image_size: data_size padded to fit the
# stages, ddpm_data.model_side).
DERIVED_KEYS = ("model", "num_classes", "dataset", "classes", "channels", "data_size", "image_size", "num_train",
                "num_val", "num_test", "global_batch_size")

TIMING_KEYS = (*WALL_PARTS, "wall_s")  # seconds per activity, and the wall time used in all


def training_config(flags, data_facts, saved_config=None, given=()):
    """The resolved config of a training run, saved in every checkpoint and in config.json.

    flags: the command line's values by config key (every setting above), and 'sampling': the resolved
    SamplerSettings; data_facts: ddpm_data.data_facts and num_train, num_val, num_test. saved_config: the checkpoint's
    config when resuming, whose fixed settings win over the flags, and whose adjustable ones win over flags not
    `given` on the command line (a key it lacks, from an older version, falls back to the flag)."""
    chosen = {key: flags[key] for key in COMMAND_LINE_SETTINGS}
    if saved_config is not None:
        kept = FIXED_SETTINGS + tuple(key for key in ADJUSTABLE_SETTINGS if key not in given)
        chosen.update({key: saved_config.get(key, chosen[key]) for key in kept})
        chosen.update(saved_model_settings(saved_config))
    classes = list(data_facts["classes"])
    side = model_side(data_facts["data_size"], len(chosen["dim_mults"]))
    model = UNetConfig.from_dict({**{key: chosen[key] for key in MODEL_SETTINGS}, "channels": data_facts["channels"],
                                  "num_classes": len(classes) if chosen["conditional"] else None, "image_size": side})
    check_attention_sides(model)
    model = dataclasses.replace(model, attn_resolutions=model.attention_sides())
    return {
        **{key: flag_value(value) for key, value in model.to_dict().items() if key in MODEL_SETTINGS},
        "model": model.to_dict(), "conditional": chosen["conditional"], "num_classes": model.num_classes,
        "dataset": data_facts["dataset"], "classes": classes, "channels": data_facts["channels"],
        "data_size": list(data_facts["data_size"]), "image_size": side, "timesteps": chosen["timesteps"],
        "schedule": chosen["schedule"], "loss_type": chosen["loss_type"], "prediction": chosen["prediction"],
        "min_snr_gamma": chosen["min_snr_gamma"], "lr_decay": chosen["lr_decay"], "lr": chosen["lr"],
        "warmup_steps": chosen["warmup_steps"], "weight_decay": chosen["weight_decay"],
        "batch_size": chosen["batch_size"], "grad_accum": chosen["grad_accum"], "epochs": chosen["epochs"],
        "p_uncond": chosen["p_uncond"], "ema_decay": chosen["ema_decay"], "seed": chosen["seed"],
        "run_name": chosen["run_name"],
        "data_dir": chosen["data_dir"], "num_train": data_facts["num_train"], "num_val": data_facts["num_val"],
        "num_test": data_facts["num_test"], "time_budget_min": chosen["time_budget_min"],
        "world_size": chosen["world_size"], "precision": chosen["precision"],
        "global_batch_size": chosen["batch_size"] * chosen["grad_accum"] * chosen["world_size"],
        "sampling": dataclasses.asdict(flags["sampling"]),
    }


def check_attention_sides(model):
    """UserError when --attn_resolutions names a side that no stage of the U-Net has."""
    sides = model.stage_sides()
    wrong = [side for side in model.attn_resolutions or () if side not in sides]
    if wrong:
        raise UserError(f"--attn_resolutions {flag_text(list(model.attn_resolutions))}: no stage works at "
                        f"{flag_text(wrong)} pixels a side; the stages of these {model.image_size}×{model.image_size} "
                        f"images work at {flag_text(sides)}")


def saved_model_settings(saved_config):
    """The model settings (MODEL_SETTINGS) of a checkpoint's network, from its model entry: those older checkpoints
    lack are the defaults they were built with."""
    model = UNetConfig.from_dict(saved_config["model"])
    return {key: flag_value(getattr(model, key)) for key in MODEL_SETTINGS}


def flag_value(value):
    """A setting as the flags hold it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def fixed_setting_conflicts(saved_config, flags, given):
    """The fixed settings given on a resume's command line with values other than the checkpoint's:
    {key: (checkpoint's value, flag's value)}."""
    saved = {**saved_config, **saved_model_settings(saved_config)}
    return {key: (saved[key], flags[key]) for key in FIXED_SETTINGS
            if key in given and key in saved and flags[key] != saved[key]}


def check_fixed_settings(saved_config, flags, given):
    """UserError naming the fixed settings a resume's command line gives other values than the checkpoint's."""
    conflicts = fixed_setting_conflicts(saved_config, flags, given)
    if conflicts:
        asked = ", ".join(f"--{key} {flag_text(value)}" for key, (_, value) in conflicts.items())
        kept = ", ".join(f"{key} {flag_text(saved_value)}" for key, (saved_value, _) in conflicts.items())
        raise UserError(f"--resume: {asked} differ from the run being resumed ({kept}); what the run trains cannot "
                        "change mid-run: drop them, or start a new run under another --run_name")


def flag_text(value):
    """A setting's value as it is written on the command line (lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


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
    return build_unet(UNetConfig.from_dict(config["model"]))


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
    budget_spent: bool = False     # the time budget stopped training (a resume needs a larger one)

    @classmethod
    def from_checkpoint(cls, ckpt):
        position = {key: ckpt[key] for key in ("epoch", "step", "batch_in_epoch", "epoch_loss_sum", "best_val")}
        return cls(**position, skipped_steps=ckpt.get("skipped_steps", 0), history=ckpt["history"],
                   timing={key: ckpt["timing"].get(key, 0.0) for key in TIMING_KEYS},
                   budget_spent=ckpt.get("budget_spent") is True)

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
    """Load a checkpoint written by this tool (weights_only=True: no code is unpickled) and check that it holds what
    sampling needs (checkpoint_problem): UserError naming the file and what is wrong."""
    return _load_checked(path, map_location)[0]


def load_sampling_model(path):
    """(checkpoint, its U-Net on the CPU with the weights it samples with: the EMA's, else the raw ones), checked as
    load_checkpoint checks; the network the check builds is the one returned."""
    ckpt, model = _load_checked(path, "cpu")
    model.load_state_dict(ckpt.get("ema") or ckpt["model"])
    return ckpt, model


def stored_run_name(config, path):
    """The run name a checkpoint's config carries, made a valid one (with a note) when it is not: an older or foreign
    file's name never chooses where files go."""
    stored = config.get("run_name")
    name = sanitized_run_name(stored)
    if name != stored:
        print(f"note: {path!r} carries the run name {str(stored)!r:.80}, which is not a valid one "
              f"({RUN_NAME_CHARACTERS}); its files are named {name!r}", file=sys.stderr)
    return name


def _load_checked(path, map_location):
    """(checkpoint, the U-Net its config describes, weights not loaded) of load_checkpoint."""
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
    model, problem = checked_network(ckpt)
    if problem:
        raise UserError(f"{path!r} is damaged or incomplete: {problem}")
    refuse_nonfinite(ckpt, path, ("ema",) if ckpt.get("ema") else ("model",))  # the weights it samples with
    return ckpt, model


def refuse_nonfinite(ckpt, path, parts):
    """UserError when the checkpoint's weights of `parts` hold NaN or infinite values."""
    if nonfinite_weights(ckpt, parts):
        raise UserError(f"{path!r} holds NaN or infinite weights (written by a run that diverged); "
                        "use an earlier checkpoint")


# ------------------------------------------------------------- what a checkpoint must hold, what a config needs

def _whole(least):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


def _number(test):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and test(v)


def _sampling_settings_valid(value):
    try:
        SamplerSettings(**value)
        return True
    except (TypeError, ValueError):
        return False


SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch's generators take (a negative seed is taken modulo 2⁶⁴)
# (test, what the value must be) of each config entry a checkpoint may hold; SAMPLING_NEEDS and RESUME_NEEDS name
# those that must be there
CONFIG_ENTRIES = {
    "model": (lambda v: isinstance(v, dict), "the U-Net's settings (a dict)"),
    "timesteps": (_whole(1), "a whole number ≥ 1"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    "image_size": (_whole(1), "a whole number ≥ 1"),
    "conditional": (lambda v: isinstance(v, bool), "true or false"),
    "num_classes": (lambda v: v is None or _whole(1)(v), "none or a whole number ≥ 1"),
    "classes": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of class names"),
    "channels": (_whole(1), "a whole number ≥ 1"),
    "data_size": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_whole(1), v)), "[height, width]"),
    "dataset": (lambda v: isinstance(v, str), "a name"),
    "prediction": (lambda v: v in PREDICTIONS, f"one of {', '.join(PREDICTIONS)}"),
    "min_snr_gamma": (lambda v: v is None or _number(lambda x: x > 0)(v), "none or a number > 0"),
    "sampling": (lambda v: isinstance(v, dict) and _sampling_settings_valid(v), "sampler settings"),
    "run_name": (lambda v: isinstance(v, str), "a name"),
    "data_dir": (lambda v: isinstance(v, str), "a folder"),
    "loss_type": (lambda v: v in LOSS_TYPES, f"one of {', '.join(LOSS_TYPES)}"),
    "dim": (_whole(1), "a whole number ≥ 1"),
    "dim_mults": (lambda v: isinstance(v, list) and v and all(map(_whole(1), v)), "a list of whole numbers ≥ 1"),
    "batch_size": (_whole(1), "a whole number ≥ 1"),
    "grad_accum": (_whole(1), "a whole number ≥ 1"),
    "world_size": (_whole(1), "a whole number ≥ 1"),
    "epochs": (_whole(1), "a whole number ≥ 1"),
    "p_uncond": (_number(lambda x: 0 <= x <= 1), "a number in [0, 1]"),
    "ema_decay": (_number(lambda x: 0 <= x < 1), "a number in [0, 1)"),
    "seed": (lambda v: _whole(SEED_RANGE[0])(v) and v <= SEED_RANGE[1], "a seed in the generator's range"),
    "lr": (_number(lambda x: x > 0), "a number > 0"),
    "lr_decay": (lambda v: v in LR_DECAYS, f"one of {', '.join(LR_DECAYS)}"),
    "warmup_steps": (_whole(0), "a whole number ≥ 0"),
    "weight_decay": (_number(lambda x: x >= 0), "a number ≥ 0"),
    "architecture": (lambda v: v in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}"),
    "num_res_blocks": (_whole(1), "a whole number ≥ 1"),
    "attn_resolutions": (lambda v: v is None or isinstance(v, list) and all(map(_whole(1), v)),
                         "none or a list of whole numbers ≥ 1"),
    "dropout": (_number(lambda x: 0 <= x < 1), "a number in [0, 1)"),
    "resblock": (lambda v: v in RESBLOCKS, f"one of {', '.join(RESBLOCKS)}"),
    "groups": (_whole(1), "a whole number ≥ 1"),
    "norm_eps": (_number(lambda x: x > 0), "a number > 0"),
    "time_budget_min": (lambda v: v is None or _number(lambda x: x > 0)(v), "none or a number > 0"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
}
SAMPLING_NEEDS = ("model", "timesteps", "schedule", "image_size")
RESUME_NEEDS = SAMPLING_NEEDS + ("run_name", "data_dir", "conditional", "num_classes", "loss_type", "batch_size",
                                 "grad_accum", "p_uncond", "ema_decay", "seed", "lr", "lr_decay", "warmup_steps",
                                 "epochs")
MODEL_ENTRIES = {key: (_whole(1), "a whole number ≥ 1") for key in ("dim", "channels", "class_emb_dim", "groups",
                                                                  "attn_heads", "attn_dim_head")}
MODEL_ENTRIES.update({key: CONFIG_ENTRIES[key] for key in ("num_classes", *MODEL_SETTINGS)},
                     image_size=(lambda v: v is None or _whole(1)(v), "none or a whole number ≥ 1"))


def _entries_problem(entries, needed, checks, where):
    missing = [key for key in needed if key not in entries]
    if missing:
        return f"{where} lacks {', '.join(missing)}"
    for key, value in entries.items():
        test, must = checks.get(key, (lambda v: True, ""))
        if not test(value):
            return f"{where}'s {key} is {value!r:.60}, not {must}"
    return None


def config_problem(config, needed=SAMPLING_NEEDS):
    """What makes a checkpoint's config unusable (None: nothing): an entry in `needed` missing, an entry that is not
    what it must be (CONFIG_ENTRIES, MODEL_ENTRIES), or settings that contradict each other."""
    if not isinstance(config, dict):
        return "its config is not a dict"
    problem = (_entries_problem(config, needed, CONFIG_ENTRIES, "the config")
               or _entries_problem(config["model"], ("dim", "dim_mults"), MODEL_ENTRIES, "the model"))
    if problem:
        return problem
    model, classes = UNetConfig.from_dict(config["model"]), config.get("classes")
    if (model.dim % model.groups or model.num_classes != config.get("num_classes", model.num_classes)
            or (model.num_classes and classes is not None and len(classes) != model.num_classes)
            or (model.attn_resolutions is not None and model.image_size is None)):
        return ("the config's settings contradict each other (dim and groups, num_classes and classes, "
                "attn_resolutions without image_size)")
    return None


def weights_problem(weights, model, what):
    """What keeps the state dict `weights` from loading into `model` (None: nothing): a missing or extra tensor, or one
    of another shape, the first named."""
    if not isinstance(weights, dict) or not all(isinstance(w, torch.Tensor) for w in weights.values()):
        return f"its {what} are not a dict of tensors"
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    reshaped = [name for name in expected if name in weights and tuple(weights[name].shape) != expected[name]]
    if not (missing or extra or reshaped):
        return None
    size = lambda shape: "×".join(map(str, shape)) or "scalar"
    if reshaped:
        first = reshaped[0]
        detail = (f"{first} is {size(weights[first].shape)} in the file and {size(expected[first])} for the "
                  f"network its config describes; {len(reshaped)} tensors differ in shape")
    else:
        detail = f"{len(missing)} tensors missing ({', '.join(missing[:2])}…), {len(extra)} unknown"
    return f"its {what} do not fit the network its config describes ({detail})"


def network_to_check(config, weights):
    """(the U-Net the config describes, None), or (None, what keeps it from being built). Built on the CPU, unless a
    count on the meta device (parameter_count) says it is far larger than `weights`: a damaged config never makes it
    allocate much more than the file holds."""
    try:
        count, held = parameter_count(UNetConfig.from_dict(config["model"])), sum(w.numel() for w in weights.values())
        if count > max(16 * held, 10 ** 8):
            return None, f"its config describes a network of {count:,} parameters, its weights hold {held:,}"
        return build_model(config), None
    except Exception as e:
        return None, f"the network its config describes cannot be built ({type(e).__name__})"


def checkpoint_problem(ckpt):
    """What keeps a checkpoint from being sampled (None: nothing): its config (config_problem), and weights ('ema', else
    'model') that fit the network the config describes."""
    return checked_network(ckpt)[1]


def checked_network(ckpt):
    """(the U-Net the checkpoint's config describes, None), or (None, checkpoint_problem's answer)."""
    problem = config_problem(ckpt["config"])
    if problem:
        return None, problem
    parts = [part for part in ("ema", "model") if ckpt.get(part)]
    if not parts:
        return None, "it holds no weights ('ema' or 'model')"
    for part in parts:
        if not isinstance(ckpt[part], dict) or not all(isinstance(w, torch.Tensor) for w in ckpt[part].values()):
            return None, f"its {part} weights are not a dict of tensors"
    model, problem = network_to_check(ckpt["config"], ckpt[parts[0]])
    problem = problem or next(filter(None, (weights_problem(ckpt[part], model, f"{part} weights") for part in parts)),
                              None)
    return (None, problem) if problem else (model, None)


POSITION_ENTRIES = {"epoch": (_whole(0), "a whole number ≥ 0"), "step": (_whole(0), "a whole number ≥ 0"),
                    "batch_in_epoch": (_whole(0), "a whole number ≥ 0"),
                    "epoch_loss_sum": (lambda v: isinstance(v, float), "a number"),
                    "best_val": (lambda v: isinstance(v, float), "a number"),
                    "history": (lambda v: isinstance(v, dict) and all(isinstance(v.get(key), list) for key in
                                ("train_loss", "val_loss", "test_loss", "epochs")), "the loss history"),
                    "timing": (lambda v: isinstance(v, dict), "seconds per activity"),
                    "rng": (lambda v: isinstance(v, dict) and isinstance(v.get("cpu"), torch.Tensor)
                            and v["cpu"].dtype == torch.uint8 and v["cpu"].shape == torch.get_rng_state().shape
                            and isinstance(v.get("cuda"), list), "the generators' states")}


def resume_problem(ckpt):
    """What keeps a last.pt that passed checkpoint_problem (so its weights fit) from being resumed (None: nothing):
    the config's training settings, both weights there, the RNG states and the position, and an optimizer state of
    the network's parameters."""
    problem = config_problem(ckpt["config"], RESUME_NEEDS)
    if problem:
        return problem
    missing = [part for part in ("model", "ema") if not ckpt.get(part)]
    if missing:
        return f"it holds no {' and no '.join(missing)} weights"
    problem = _entries_problem(ckpt, tuple(POSITION_ENTRIES), POSITION_ENTRIES, "the checkpoint")
    if problem:
        return problem
    parameters = build_model(ckpt["config"]).parameters()  # in the order AdamW numbers them
    return optimizer_problem(ckpt["optimizer"], [p.shape for p in parameters])


def optimizer_problem(state, shapes):
    """What keeps AdamW's state dict from fitting parameters of `shapes` (None: nothing)."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(state.get("state"), dict):
        return "its optimizer state is not AdamW's over one parameter group"
    if len(groups[0].get("params", ())) != len(shapes):
        return (f"its optimizer state is for {len(groups[0].get('params', ()))} parameters, the network has "
                f"{len(shapes)}")
    for index, moments in state["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(shapes) and isinstance(moments, dict)) or any(
                moments.get(key) is None or moments[key].shape != shapes[index] for key in ("exp_avg", "exp_avg_sq")):
            return f"its optimizer state of parameter {index} does not fit the network"
    return None


def parameter_count(model_config):
    """The parameters of the U-Net a UNetConfig describes, counted on the meta device (nothing allocated) without the
    class embedding (its normal_ initialisation there imports torch._dynamo, a second): exact for unconditional
    networks, a lower bound for conditional ones. Widths no machine could hold are not built even there: their count
    is the lower bound of the middle blocks' four 3 × 3 convolutions."""
    widest = model_config.dim * model_config.dim_mults[-1]
    lower_bound = 4 * 9 * widest ** 2
    if lower_bound > 2 ** 50:  # 10¹⁵ parameters: more than any machine holds, and past what meta shapes can count
        return lower_bound
    with torch.device("meta"):
        return sum(p.numel() for p in build_unet(dataclasses.replace(model_config, num_classes=None)).parameters())


SCHEDULE_BYTES_PER_STEP = 15 * (8 + 4)  # Diffusion's 15 per-t tables, built in float64 and kept in float32
TRAINING_COPIES = 5                     # weights, their gradients, the EMA and AdamW's two moments, float32 each
ACTIVATION_BYTES = 2                    # the least a stored activation takes (bf16 / fp16 autocast)


def memory_needs(model_config, timesteps, side, sample_batch, samples_kept, training, guided):
    """What a run needs in memory before it starts, as lower bounds [(bytes, what, flag that lowers it)]: the weights
    (and for `training` their gradients, EMA and optimizer moments), the noise schedule, one sampling batch (its images
    and the U-Net's skip connections, for both halves of a guided batch) and the samples kept (float32, C × side²)."""
    params = parameter_count(model_config)
    copies = TRAINING_COPIES if training else 1
    dims = [model_config.dim * m for m in model_config.dim_mults]
    stage_inputs = [model_config.dim] + dims[:-1]                   # channels of each stage's skips (or more)
    skips = model_config.dim * side ** 2 + sum(model_config.num_res_blocks * d * (side // 2 ** i) ** 2
                                               for i, d in enumerate(stage_inputs))
    image = model_config.channels * side ** 2
    return [(params * 4 * copies, f"for {params:,} parameters{' while training' if training else ''}",
             "--dim or --dim_mults"),
            (timesteps * SCHEDULE_BYTES_PER_STEP, f"for the noise schedule of T = {timesteps:,}", "--timesteps"),
            (sample_batch * (2 if guided else 1) * (skips * ACTIVATION_BYTES + 4 * image * 4),
             f"for a sampling batch of {sample_batch:,}", "--sample_batch"),
            (samples_kept * image * 4, f"to hold {samples_kept:,} samples",
             "--eval_fid" if training else "--num_samples or --eval_fid")]


def check_run_memory(device, sample_batch, model_config, timesteps, side, samples, training, guided):
    """UserError before anything is allocated when the weights, the schedule, one sampling batch (of sample_batch) and
    the samples kept need more memory than the device (and for the samples, the machine) has: memory_needs. On CUDA a
    batch that does not fit is halved down to one image (generate), so only one image of it must fit there."""
    batch = 1 if device.type == "cuda" else min(sample_batch, samples)
    needs = memory_needs(model_config, timesteps, side, batch, samples, training, guided)
    check_memory(needs[:3], device, needs[3:])


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
    problem = resume_problem(ckpt)
    if problem:
        raise UserError(f"{path!r} is damaged or incomplete: {problem}")
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


def imported_checkpoint(config, weights, source):
    """The checkpoint of a network imported from the file `source` (ddpm_interop): config, weights as 'ema' (what
    sampling uses), and where they came from."""
    return {**checkpoint_header(config), "ema": weights,
            "imported_from": {"file": os.path.abspath(source), "sha256": file_digest(source)}}


def export_for_inference(ckpt, path):
    """Write a small inference-only checkpoint: config and EMA weights in bf16 (no optimizer, no raw weights).
    The training machine's data folder means nothing elsewhere: the config's data_dir becomes the default."""
    weights = ckpt.get("ema") or ckpt["model"]
    small = {**checkpoint_header({**ckpt["config"], "data_dir": "./data"}),
             "ema": {k: v.to(torch.bfloat16) for k, v in weights.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_torch_save(small, path)
