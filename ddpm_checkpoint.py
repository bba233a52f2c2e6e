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
    sha256             the digest of everything else it holds (checkpoint_digest): a damaged file is refused

An export for inference (export_for_inference) keeps format, version, config, versions and the EMA weights in bf16.
An imported network (imported_checkpoint) has format, version, config, versions, its weights as 'ema' in float32, and
imported_from: the file it was made from and that file's SHA-256.

Every checkpoint is checked before it is used: its digest, its config against the settings' declarations, its weights
against the network the config describes, and for a resume its training state, optimizer and RNG states.
"""
import dataclasses
import hashlib
import math
import os
import platform
import sys
import warnings
from dataclasses import dataclass, field

import torch

from ddpm_config import (ADJUSTABLE, AT_LEAST_ONE, BY_NAME, FIXED, MODEL_SETTINGS, NOT_NEGATIVE, POSITIVE, RUN,
                         SAMPLING, SETTINGS, Range, Value, build_model, short_repr)
from ddpm_diffusion import SamplerSettings
from ddpm_download import file_digest
from ddpm_helpers import (NonFiniteError, RUN_NAME_CHARACTERS, UserError, atomic_torch_save, input_file_problem,
                          new_folder, run_lock, sanitized_run_name, write_json)
from ddpm_model import UNetConfig
from ddpm_runtime import parameter_count
from ddpm_train_step import WALL_PARTS

CHECKPOINT_FORMAT = "ddpm-cifar10"
CHECKPOINT_VERSION = 1
TOOL_VERSION = "0.1.0"

TIMING_KEYS = (*WALL_PARTS, "wall_s")  # seconds per activity, and the wall time used in all


def environment_versions():
    return {"tool": TOOL_VERSION, "torch": str(torch.__version__), "python": platform.python_version()}


def checkpoint_header(config):
    """What every checkpoint of this tool starts with: format, version, config and versions."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
            "versions": environment_versions()}


def write_config_json(config, path):
    """config.json beside the checkpoints: the resolved config and the versions, for people and other tools."""
    write_json({**config, "versions": environment_versions()}, path)


HISTORY_KEYS = ("train_loss", "val_loss", "test_loss", "epochs")


@dataclass
class TrainingState:
    """Where training stands: what a checkpoint holds besides the config, weights, optimizer and RNG."""
    epoch: int = 0                 # epochs finished
    step: int = 0                  # optimizer steps taken
    batch_in_epoch: int = 0        # batches done in the current epoch (non-zero after a mid-epoch save)
    epoch_loss_sum: float = 0.0    # the sum of those batches' losses
    best_val: float = math.inf     # the lowest validation loss so far (best.pt)
    skipped_steps: int = 0         # fp16 steps the loss scaler skipped because their gradients overflowed
    history: dict = field(default_factory=lambda: {key: [] for key in HISTORY_KEYS})
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
        for key, value in zip(HISTORY_KEYS, (train_loss, val_loss, test_loss, epoch)):
            self.history[key].append(value)
        is_best = val_loss < self.best_val
        self.best_val = min(self.best_val, val_loss)
        return is_best

    def finish_epoch(self, epoch):
        self.epoch, self.batch_in_epoch, self.epoch_loss_sum = epoch, 0, 0.0


COUNT = Value(int, NOT_NEGATIVE)
# What a checkpoint's TrainingState entries may be (a resume checks them before it uses them); older files lack
# skipped_steps, budget_spent and some timing keys, whose defaults are used
STATE_ENTRIES = {
    "epoch": COUNT, "step": COUNT, "batch_in_epoch": COUNT, "skipped_steps": COUNT, "epoch_loss_sum": Value(float),
    "best_val": Value(float, infinite=True), "budget_spent": Value(bool),
    "history": Value(dict, fields={key: Value(float, many=True, min_items=0) for key in HISTORY_KEYS},
                     what="the loss history"),
    "timing": Value(dict, fields={key: Value(float, NOT_NEGATIVE) for key in TIMING_KEYS},
                    what="seconds per activity"),
    "grad_scaler": Value(dict, optional=True, what="fp16's loss scaler state", fields={
        "scale": Value(float, POSITIVE), "growth_factor": Value(float, POSITIVE),
        "backoff_factor": Value(float, POSITIVE), "growth_interval": Value(int, AT_LEAST_ONE),
        "_growth_tracker": COUNT}),
}
STATE_NEEDS = ("epoch", "step", "batch_in_epoch", "epoch_loss_sum", "best_val", "history", "timing")
# What AdamW's hyper-parameters in a checkpoint may be (its one parameter group)
OPTIMIZER_ENTRIES = {"lr": Value(float, NOT_NEGATIVE), "eps": Value(float, POSITIVE),
                     "betas": Value(float, Range(0, 1, open_high=True), many=True, length=2),
                     "weight_decay": Value(float, NOT_NEGATIVE), "amsgrad": Value(bool), "maximize": Value(bool),
                     "foreach": Value(bool, optional=True), "capturable": Value(bool),
                     "differentiable": Value(bool), "fused": Value(bool, optional=True),
                     "decoupled_weight_decay": Value(bool)}


ANY_SIZE = Value(int, AT_LEAST_ONE)
# What each config entry a checkpoint may hold must be: the stored settings' from their own declarations (what their
# flags are checked by), the derived entries' here. SAMPLING_NEEDS and RESUME_NEEDS name those that must be there.
SAMPLING_ENTRIES = {setting.field or setting.name: setting.value for setting in SETTINGS if setting.stored == SAMPLING}
MODEL_ENTRIES = {
    **{key: BY_NAME[key].value for key in MODEL_SETTINGS}, "channels": ANY_SIZE, "class_emb_dim": ANY_SIZE,
    "attn_heads": ANY_SIZE, "attn_dim_head": ANY_SIZE, "num_classes": Value(int, AT_LEAST_ONE, optional=True),
    "image_size": Value(int, AT_LEAST_ONE, optional=True)}
CONFIG_ENTRIES = {
    **{setting.name: setting.value for setting in SETTINGS if setting.stored in (FIXED, ADJUSTABLE, RUN)},
    "model": Value(dict, fields=MODEL_ENTRIES, what="the U-Net's settings (a dict)"),
    "image_size": ANY_SIZE, "num_classes": Value(int, AT_LEAST_ONE, optional=True),
    "classes": Value(str, many=True, min_items=0, what="a list of class names"), "channels": ANY_SIZE,
    "data_size": Value(int, AT_LEAST_ONE, many=True, length=2, what="[height, width]"),
    "dataset": Value(str, what="a name"),
    "sampling": Value(dict, fields=SAMPLING_ENTRIES, closed=True, what="sampler settings"),
}
SAMPLING_NEEDS = ("model", "timesteps", "schedule", "image_size")
RESUME_NEEDS = SAMPLING_NEEDS + ("run_name", "data_dir", "conditional", "num_classes", "loss_type", "batch_size",
                                 "grad_accum", "p_uncond", "ema_decay", "seed", "lr", "lr_decay", "warmup_steps",
                                 "epochs")
MAX_NESTING = 32  # the deepest a checkpoint's entries go (an optimizer's moments: 4)


def entries_problem(entries, needed, values, where):
    """What is wrong with a dict of stored values (None: nothing): an entry of `needed` missing, or one that its
    Value in `values` refuses."""
    missing = [key for key in needed if key not in entries]
    if missing:
        return f"{where} lacks {', '.join(missing)}"
    return next(filter(None, (value.problem(entries[key], f"{where}'s {key}") for key, value in values.items()
                              if key in entries)), None)


def nesting_problem(obj, where, limit=MAX_NESTING):
    """An entry of `obj` nested more than `limit` deep (None: none), found without recursion: no later walk runs
    out of stack."""
    stack = [(obj, 0, where)]
    while stack:
        value, depth, name = stack.pop()
        if depth > limit:
            return f"{name} is nested more than {limit} deep"
        if isinstance(value, dict):
            stack += [(v, depth + 1, name if depth else f"{where}'s {k}") for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [(v, depth + 1, name) for v in value]
    return None


def config_problem(config, needed=SAMPLING_NEEDS):
    """What makes a checkpoint's config unusable (None: nothing): an entry of `needed` missing, one that is not what
    CONFIG_ENTRIES says, or settings that contradict each other."""
    if not isinstance(config, dict):
        return "its config is not a dict"
    problem = (nesting_problem(config, "the config") or entries_problem(config, needed, CONFIG_ENTRIES, "the config")
               or entries_problem(config["model"], ("dim", "dim_mults"), MODEL_ENTRIES, "the model")
               or sampling_problem(config.get("sampling"), config["timesteps"]))
    if problem:
        return problem
    model, classes = UNetConfig.from_dict(config["model"]), config.get("classes")
    if model.num_classes and classes is None:
        return f"the config lacks classes (the names of its model's {model.num_classes} classes)"
    if (model.dim % model.groups or model.num_classes != config.get("num_classes", model.num_classes)
            or (model.num_classes and classes is not None and len(classes) != model.num_classes)
            or (model.attn_resolutions is not None and model.image_size is None)):
        return ("the config's settings contradict each other (dim and groups, num_classes and classes, "
                "attn_resolutions without image_size)")
    return image_size_problem(config, model)


def sampling_problem(sampling, timesteps):
    """What SamplerSettings refuses in a config's sampling entry for a T-step model (None: nothing, or no entry)."""
    try:
        SamplerSettings(**sampling).for_timesteps(timesteps) if sampling is not None else None
    except (TypeError, ValueError) as e:
        return f"the config's sampling is not sampler settings ({e})"
    return None


def image_size_problem(config, model):
    """The config's and its model's side differ, or it cannot be halved once per stage after the first (None: fine)."""
    side, unit = config["image_size"], 2 ** (len(model.dim_mults) - 1)
    if model.image_size is not None and model.image_size != side:
        return f"the config's image_size ({side}) and its model's ({model.image_size}) differ"
    if side % unit:
        return (f"the config's image_size is {side}, and its {len(model.dim_mults)} stages need at least {unit} pixels "
                f"a side, a multiple of {unit}")
    return None


def build_checkpoint(config, model, ema_model, optimizer, state, use_cuda, scaler=None):
    """The checkpoint dict of a training run at this moment; scaler: fp16's GradScaler, or None."""
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
    """Write atomically, best.pt without the optimizer; NaN or infinite weights are never written (NonFiniteError)."""
    require_finite_weights(ckpt)
    write_checkpoint(ckpt if with_optimizer else {k: v for k, v in ckpt.items() if k != "optimizer"}, path)


DIGEST_KEY = "sha256"  # a checkpoint's digest of everything else it holds


def write_checkpoint(ckpt, path):
    """The one writer of checkpoint files: `ckpt` with its digest (checkpoint_digest), written atomically."""
    atomic_torch_save({**ckpt, DIGEST_KEY: checkpoint_digest(ckpt)}, path)


def checkpoint_digest(ckpt):
    """SHA-256 of everything the checkpoint holds but its digest: tensors' dtype, shape and bytes, other values'
    repr, dict keys sorted."""
    digest = hashlib.sha256()
    _feed_digest(digest, {key: value for key, value in ckpt.items() if key != DIGEST_KEY})
    return digest.hexdigest()


def _feed_digest(digest, value):
    if isinstance(value, torch.Tensor):
        digest.update(f"tensor {value.dtype} {tuple(value.shape)} {value.layout} {value.device.type}:".encode())
        if value.layout == torch.strided and value.device.type == "cpu":  # what this tool writes; else no bytes
            digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}:".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            _feed_digest(digest, key)
            _feed_digest(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"list {len(value)}:".encode())
        for item in value:
            _feed_digest(digest, item)
    else:
        text = repr(value)
        digest.update(f"{type(value).__name__} {len(text)}:{text}".encode())


def digest_problem(ckpt, path):
    """What the digest says of a checkpoint (None: it matches); a note when it carries none."""
    if DIGEST_KEY not in ckpt:
        print(f"note: {path!r} carries no digest (written before checkpoints had one, or by another tool): its "
              "contents are not checked against one", file=sys.stderr)
        return None
    if ckpt[DIGEST_KEY] != checkpoint_digest(ckpt):
        return "its contents differ from the digest it was written with (a changed byte, or a copy cut short)"
    return None


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint of this tool, loaded with weights_only=True and checked (_load_checked): UserError otherwise."""
    return _load_checked(path, map_location)[0]


def load_sampling_model(path):
    """(checkpoint, its U-Net on the CPU holding the weights it samples with: the EMA's, else the raw ones)."""
    ckpt, model = _load_checked(path, "cpu")
    model.load_state_dict(ckpt.get("ema") or ckpt["model"])
    return ckpt, model


def stored_run_name(config, path):
    """The run name a checkpoint's config carries, made a valid one (with a note): a file never chooses where
    files go."""
    stored = config.get("run_name")
    name = sanitized_run_name(stored)
    if name != stored:
        print(f"note: {path!r} carries the run name {str(stored)!r:.80}, which is not a valid one "
              f"({RUN_NAME_CHARACTERS}); its files are named {name!r}", file=sys.stderr)
    return name


def inference_run_name(model_path, config):
    """What inference names its outputs: the run folder of a file the tool wrote (models/<name>/ckpt.pt), else
    the file's own name (ho2020.pt → ho2020), else the checkpoint's stored run name."""
    path = os.path.abspath(model_path)
    name = os.path.basename(os.path.dirname(path)) if os.path.basename(path) in CHECKPOINT_FILES else \
        os.path.splitext(os.path.basename(path))[0]
    return name if sanitized_run_name(name) == name else stored_run_name(config, model_path)


CHECKPOINT_FILES = ("ckpt.pt", "last.pt", "best.pt")  # what training writes into models/<run_name>/


def _load_checked(path, map_location):
    """(checkpoint, the U-Net its config describes, weights not loaded) of load_checkpoint."""
    if not path:
        raise UserError("--model_path is required with --inference")
    problem = input_file_problem(path)
    if problem:
        raise UserError(f"--model_path {path!r} {problem}")
    try:
        with warnings.catch_warnings():  # torch's warnings about what a file holds: the checks below say it in words
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path!r} is not a readable checkpoint ({type(e).__name__}); "
                        "it is corrupt or was not written by torch.save") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "config" not in ckpt:
        raise UserError(f"{path!r} is not a checkpoint of this tool (ddpm_main.py); "
                        "it holds no 'format': 'ddpm-cifar10' entry and config")
    problem = nesting_problem(ckpt, "the checkpoint")
    if problem:
        raise UserError(f"{path!r} is damaged or incomplete: {problem}")
    problem = digest_problem(ckpt, path)
    if problem:
        raise UserError(f"{path!r} is damaged: {problem}; use another copy or an earlier checkpoint")
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

REAL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_plain_tensor(t, dtypes=REAL_FLOATS):
    """A dense tensor held in the file (not on the meta device) of one of `dtypes`."""
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type == "cpu" and t.dtype in dtypes


def weight_tensors_problem(weights, what):
    """What keeps `weights` from being weights (None: nothing): not a dict of tensors, or a tensor that is not
    dense, not in the file or not real floating point."""
    if not isinstance(weights, dict) or not all(isinstance(w, torch.Tensor) for w in weights.values()):
        return f"its {what} are not a dict of tensors"
    for name, w in weights.items():
        if w.layout != torch.strided:
            return f"its {what} hold {name} as a {str(w.layout).split('_')[0][6:]} tensor, not a dense one"
        if w.device.type != "cpu":
            return f"its {what} hold {name} on the {w.device.type} device, not in the file"
        if w.dtype not in REAL_FLOATS:
            return f"its {what} hold {name} as {w.dtype}, not real floating point"
    return None


def weights_problem(weights, model, what):
    """The first tensor of `weights` missing, extra or of another shape than `model` has (None: they fit)."""
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
    """(the U-Net the config describes, None), or (None, why not): never built when it would be far larger than
    `weights` (parameter_count on the meta device)."""
    try:
        count, held = parameter_count(UNetConfig.from_dict(config["model"])), sum(w.numel() for w in weights.values())
        if count > max(16 * held, 10 ** 8):
            return None, f"its config describes a network of {count:,} parameters, its weights hold {held:,}"
        return build_model(config), None
    except Exception as e:
        return None, f"the network its config describes cannot be built ({type(e).__name__})"


def checked_network(ckpt):
    """(the U-Net the checkpoint's config describes, None), or (None, what keeps it from being sampled)."""
    problem = config_problem(ckpt["config"])
    if problem:
        return None, problem
    parts = [part for part in ("ema", "model") if ckpt.get(part) is not None and not (
        isinstance(ckpt[part], dict) and not ckpt[part])]  # present, and not an empty dict
    if not parts:
        return None, "it holds no weights ('ema' or 'model')"
    problem = next(filter(None, (weight_tensors_problem(ckpt[part], f"{part} weights") for part in parts)), None)
    if problem:
        return None, problem
    model, problem = network_to_check(ckpt["config"], ckpt[parts[0]])
    problem = problem or next(filter(None, (weights_problem(ckpt[part], model, f"{part} weights") for part in parts)),
                              None)
    return (None, problem) if problem else (model, None)


def resume_problem(ckpt):
    """What keeps a last.pt that passed checked_network from being resumed (None: nothing): its training settings,
    both weights, training state, RNG and optimizer states."""
    problem = config_problem(ckpt["config"], RESUME_NEEDS)
    if problem:
        return problem
    missing = [part for part in ("model", "ema") if not ckpt.get(part)]
    if missing:
        return f"it holds no {' and no '.join(missing)} weights"
    problem = entries_problem(ckpt, STATE_NEEDS, STATE_ENTRIES, "the checkpoint") or rng_problem(ckpt.get("rng"))
    if problem:
        return problem
    if len({len(ckpt["history"][key]) for key in HISTORY_KEYS}) != 1:
        return "the checkpoint's history holds lists of different lengths"
    parameters = build_model(ckpt["config"]).parameters()  # in the order AdamW numbers them
    return optimizer_problem(ckpt.get("optimizer"), [p.shape for p in parameters])


def rng_problem(rng):
    """What keeps a checkpoint's RNG states from being restored (None: nothing)."""
    cpu = rng.get("cpu") if isinstance(rng, dict) else None
    if not (is_plain_tensor(cpu, (torch.uint8,)) and cpu.shape == torch.get_rng_state().shape
            and isinstance(rng.get("cuda"), list) and all(is_plain_tensor(s, (torch.uint8,)) for s in rng["cuda"])):
        return f"the checkpoint's rng is {short_repr(rng)}, not the generators' states"
    return None


def optimizer_problem(state, shapes):
    """What keeps AdamW's state dict from fitting parameters of `shapes` (None: nothing): one parameter group as
    OPTIMIZER_ENTRIES says, per parameter a step count and two moments of its shape."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and isinstance(state.get("state"), dict)):
        return "its optimizer state is not AdamW's over one parameter group"
    params = groups[0].get("params")
    if not isinstance(params, list):
        return "its optimizer state is not AdamW's over one parameter group"
    if len(params) != len(shapes):
        return f"its optimizer state is for {len(params)} parameters, the network has {len(shapes)}"
    problem = entries_problem(groups[0], (), OPTIMIZER_ENTRIES, "its optimizer")
    if problem:
        return problem
    for index, moments in state["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(shapes) and isinstance(moments, dict)
                and all(is_plain_tensor(moments.get(key)) and moments[key].shape == shapes[index]
                        for key in ("exp_avg", "exp_avg_sq"))
                and step_count_holds(moments.get("step"))):
            return f"its optimizer state of parameter {short_repr(index)} does not fit the network"
    return None


def step_count_holds(step):
    """An AdamW step count: a number, or a one-element real floating-point tensor, finite and ≥ 0."""
    if isinstance(step, torch.Tensor):
        return is_plain_tensor(step) and step.numel() == 1 and bool(torch.isfinite(step).all()) and step.item() >= 0
    return COUNT.holds(step) or Value(float, NOT_NEGATIVE).holds(step)


def resumable_runs(models_dir):
    """A phrase naming the runs under models_dir that hold a last.pt."""
    names = sorted(name for name in (os.listdir(models_dir) if os.path.isdir(models_dir) else [])
                   if os.path.isfile(os.path.join(models_dir, name, "last.pt")))
    return f"runs with a last.pt in {models_dir}: {', '.join(names)}" if names else f"{models_dir} holds no last.pt"


def load_resumable(resume, models_dir, run_name):
    """(path, checkpoint) of the last.pt --resume names ('auto': <models_dir>/<run_name>/last.pt), with optimizer."""
    path = resume
    if path == "auto":
        path = os.path.join(models_dir, run_name, "last.pt")
        if not os.path.isfile(path):
            raise UserError(f"--resume auto looked for {path} and found nothing to resume. A run writes last.pt "
                            "after its first --checkpoint_minutes of training or its first epoch, and on Ctrl-C or "
                            "SIGTERM, so a run stopped sooner left none; or it ran under another --run_name or "
                            f"--models_dir ({resumable_runs(models_dir)})")
    elif input_file_problem(path):
        raise UserError(f"--resume {path!r} {input_file_problem(path)}")
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt:
        raise UserError(f"--resume {path!r} holds weights only (no optimizer state); resume from last.pt")
    problem = resume_problem(ckpt)
    if problem:
        raise UserError(f"{path!r} is damaged or incomplete: {problem}")
    refuse_nonfinite(ckpt, path, ("model", "ema"))
    return path, ckpt


def restore_training(ckpt, model, ema_model, optimizer, use_cuda, scaler=None):
    """Put a checkpoint's weights, EMA, optimizer, RNG states and fp16's loss scale (when both sides have one) back;
    returns its TrainingState."""
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


def refuse_existing_run(files, writer):
    """UserError where <models_dir>/<run>/ holds files, or a file stands in its place; `writer` ('an import') says
    who would write it."""
    held = sorted(os.listdir(files.ckpt_dir)) if os.path.isdir(files.ckpt_dir) else []
    if held or (os.path.lexists(files.ckpt_dir) and not os.path.isdir(files.ckpt_dir)):  # files, or a file
        raise UserError(f"{files.ckpt_dir} exists{' and holds ' + ', '.join(held[:3]) if held else ''}: {writer} "
                        "writes a new run folder; give another --run_name (or move that run first)")


def write_new_run(files, ckpt, config, writer):
    """ckpt.pt and config.json of a new run folder <models_dir>/<run>/, together or neither, under the run's lock
    (refuse_existing_run)."""
    with run_lock(files):
        refuse_existing_run(files, writer)
        with new_folder(files.ckpt_dir) as folder:
            save_checkpoint(ckpt, os.path.join(folder, "ckpt.pt"))
            write_config_json(config, os.path.join(folder, "config.json"))


def imported_checkpoint(config, weights, source):
    """The checkpoint of a network imported from the file `source`: its weights as 'ema', and their origin."""
    return {**checkpoint_header(config), "ema": weights,
            "imported_from": {"file": os.path.abspath(source), "sha256": file_digest(source)}}


def export_for_inference(ckpt, path):
    """Write a small inference-only checkpoint: config and EMA weights in bf16; data_dir back to the default."""
    weights = ckpt.get("ema") or ckpt["model"]
    small = {**checkpoint_header({**ckpt["config"], "data_dir": "./data"}),
             "ema": {k: v.to(torch.bfloat16) for k, v in weights.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_checkpoint(small, path)
