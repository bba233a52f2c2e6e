"""Foreign weights in and out of Ho et al.'s CIFAR-10 network (DDPMUNet).

In: pesser/pytorch_diffusion's state dict (Ho et al.'s TensorFlow checkpoints converted to PyTorch, `model-790000.ckpt`)
and diffusers' UNet2DModel folder (`config.json` and `diffusion_pytorch_model.safetensors` or `.bin`, e.g.
google/ddpm-cifar10-32, with `scheduler_config.json`), old attention names included. Out: a diffusers DDPMPipeline
folder. Files are read without running code (torch.load with weights_only=True, safetensors), and every tensor's name
and shape is checked against the network before anything is written. The jobs --import_weights and --export_diffusers.
"""
import json
import os
import re
import sys
from dataclasses import dataclass

import torch

from ddpm_checkpoint import (ANY_SIZE, entries_problem, imported_checkpoint, load_sampling_model, nesting_problem,
                             weight_tensors_problem, write_new_run)
from ddpm_config import BY_NAME, COMMAND_LINE_SETTINGS, MODEL_SETTINGS, Range, Value, flag_value, training_config
from ddpm_data import CIFAR10_CLASSES, DEFAULT_DATA_DIR
from ddpm_diffusion import SamplerSettings, scaled_beta_range
from ddpm_download import RemoteFile, fetched
from ddpm_flags import files_read
from ddpm_helpers import RunFiles, UserError, make_way, sanitized_run_name, stderr_is_terminal, write_folder
from ddpm_jobs import JOB
from ddpm_model import DDPMUNet, UNetConfig
from ddpm_presets import PRESETS
from ddpm_sample import asked_sampling, describe_sampling, sampler_settings

PAPER_SIDE = 32           # CIFAR-10's images: what the imported networks are for
PAPER_GROUPS, PAPER_EPS = 32, 1e-6  # Ho et al.'s GroupNorm, which a state dict does not record
PAPER_DROPOUT = 0.1       # Ho et al.'s CIFAR-10 dropout: a setting of training only, kept in the config
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release the written folders were checked against (tests/test_interop.py)

# Ho et al.'s published CIFAR-10 weights, by the names --import_weights takes: pesser's conversions, with the MD5s
# pesser/pytorch_diffusion checks them by
PUBLISHED = {
    "ho2020-ema": RemoteFile("https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1",
                             "1fa350b952534ae442b1d5235cce5cd3", 143_000_000,
                             "Ho et al.'s CIFAR-10 EMA weights (FID 3.17)", "--import_weights", "md5",
                             "ho2020-ema-cifar10-model-790000.ckpt"),
    "ho2020-raw": RemoteFile("https://heibox.uni-heidelberg.de/f/869980b53bf5416c8a28/?dl=1",
                             "82ed3067fd1002f5cf4c339fb80c4669", 143_000_000,
                             "Ho et al.'s CIFAR-10 weights without EMA", "--import_weights", "md5",
                             "ho2020-cifar10-model-790000.ckpt"),
}
HUB_FOLDER = "google/ddpm-cifar10-32"  # diffusers' copy, not the EMA weights; it publishes no checksum

# Each module of DDPMUNet (a regular expression over its state-dict path) and where pesser's and diffusers' networks
# keep it: {i} a down level, {j} a block, {k} an up stage (ups.k is level L − 1 − k: {level})
MODULES = [
    (r"time_mlp\.1", "temb.dense.0", "time_embedding.linear_1"),
    (r"time_mlp\.3", "temb.dense.1", "time_embedding.linear_2"),
    (r"init_conv", "conv_in", "conv_in"),
    (r"downs\.(?P<i>\d+)\.0\.(?P<j>\d+)\.0", "down.{i}.block.{j}", "down_blocks.{i}.resnets.{j}"),
    (r"downs\.(?P<i>\d+)\.0\.(?P<j>\d+)\.1", "down.{i}.attn.{j}", "down_blocks.{i}.attentions.{j}"),
    (r"downs\.(?P<i>\d+)\.1\.conv", "down.{i}.downsample.conv", "down_blocks.{i}.downsamplers.0.conv"),
    (r"mid_block1", "mid.block_1", "mid_block.resnets.0"),
    (r"mid_attn", "mid.attn_1", "mid_block.attentions.0"),
    (r"mid_block2", "mid.block_2", "mid_block.resnets.1"),
    (r"ups\.(?P<k>\d+)\.0\.(?P<j>\d+)\.0", "up.{level}.block.{j}", "up_blocks.{k}.resnets.{j}"),
    (r"ups\.(?P<k>\d+)\.0\.(?P<j>\d+)\.1", "up.{level}.attn.{j}", "up_blocks.{k}.attentions.{j}"),
    (r"ups\.(?P<k>\d+)\.1\.conv", "up.{level}.upsample.conv", "up_blocks.{k}.upsamplers.0.conv"),
    (r"out\.0", "norm_out", "conv_norm_out"),
    (r"out\.2", "conv_out", "conv_out"),
]
STYLES = ("pesser", "diffusers")
FORMAT_NAMES = {"pesser": "pesser/pytorch_diffusion's format", "diffusers": "diffusers' UNet2DModel"}
# The parts of a ResNet block and an attention whose names differ (the rest, norm1, conv1, norm2, conv2, keep theirs):
# our part → (pesser's, diffusers'); a tuple of three: the q, k, v that DDPMUNet keeps in one to_qkv convolution
PARTS = {"emb_proj.1": ("temb_proj", "time_emb_proj"), "skip": ("nin_shortcut", "conv_shortcut"),
         "norm": ("norm", "group_norm"), "to_qkv": (("q", "k", "v"), ("to_q", "to_k", "to_v")),
         "to_out": ("proj_out", "to_out.0")}
OLD_DIFFUSERS_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # before 0.14
LINEAR_PARTS = ("to_qkv", "to_out")  # diffusers' attention projections are Linear layers, DDPMUNet's 1 × 1 convolutions
KEY = re.compile(r"(?P<module>.+?)(?:\.(?P<part>norm1|conv1|emb_proj\.1|norm2|conv2|skip|norm|to_qkv|to_out))?"
                 r"\.(?P<param>weight|bias)$")

# What UNet2DModel's config.json must say to be Ho et al.'s layout: key → (the value, diffusers' default when absent)
DIFFUSERS_LAYOUT = {
    "act_fn": ("silu", "silu"), "time_embedding_type": ("positional", "positional"),
    "flip_sin_to_cos": (False, True), "freq_shift": (1, 0), "center_input_sample": (False, False),
    "downsample_padding": (0, 1), "downsample_type": ("conv", "conv"), "upsample_type": ("conv", "conv"),
    "mid_block_scale_factor": (1, 1), "resnet_time_scale_shift": ("default", "default"),
    "class_embed_type": (None, None), "num_class_embeds": (None, None), "time_embedding_dim": (None, None),
    "add_attention": (True, True), "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
}
SCHEDULE_NAMES = {"linear": "linear", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}  # diffusers' → the tool's
VARIANCE_NAMES = {"fixed_large": "beta", "fixed_small": "posterior"}
PREDICTION_NAMES = {"epsilon": "eps", "v_prediction": "v"}
# What the entries of diffusers' files that the tool reads may be: those with a flag, the Value that checks the flag
BLOCK_NAMES = Value(str, many=True, what="a list of block names")
UNET_ENTRIES = {"norm_num_groups": BY_NAME["groups"].value, "norm_eps": BY_NAME["norm_eps"].value,
                "sample_size": ANY_SIZE, "in_channels": ANY_SIZE, "out_channels": ANY_SIZE,
                "down_block_types": BLOCK_NAMES, "up_block_types": BLOCK_NAMES}
SCHEDULER_ENTRIES = {"num_train_timesteps": BY_NAME["timesteps"].value,
                     "beta_start": Value(float, Range(0, 1, open_low=True)),
                     "beta_end": Value(float, Range(0, 1, open_low=True)),
                     "beta_schedule": Value(str, choices=tuple(SCHEDULE_NAMES)),
                     "variance_type": Value(str, choices=tuple(VARIANCE_NAMES)),
                     "prediction_type": Value(str, choices=tuple(PREDICTION_NAMES))}


@dataclass
class ForeignWeights:
    """A foreign file as read: its tensors by their own names, and what it says of its network and diffusion."""
    style: str                 # "pesser" or "diffusers"
    tensors: dict              # name → tensor
    source: str                # the file read, for messages
    unet_config: dict = None   # diffusers' config.json
    scheduler: dict = None     # diffusers' scheduler_config.json


@dataclass
class Imported:
    """What an import makes of a foreign file: the network, its weights in DDPMUNet's names, and the diffusion."""
    network: UNetConfig
    weights: dict
    timesteps: int = 1000
    schedule: str = "linear"
    prediction: str = "eps"
    variance: str = "beta"     # σ_t² of the ancestral sampler: Ho et al. sampled CIFAR-10 with β_t


# ------------------------------------------------------------------------------------------ reading

def read_foreign(path):
    """ForeignWeights of a pesser state dict, a diffusers folder, or a diffusers weights file; UserError otherwise."""
    if os.path.isdir(path):
        folder = os.path.join(path, "unet") if os.path.isfile(os.path.join(path, "unet", "config.json")) else path
        weights = next((os.path.join(folder, name) for name in ("diffusion_pytorch_model.safetensors",
                                                                "diffusion_pytorch_model.bin")
                        if os.path.isfile(os.path.join(folder, name))), None)
        if weights is None or not os.path.isfile(os.path.join(folder, "config.json")):
            raise UserError(f"--import_weights {path!r} is a folder without a diffusers UNet2DModel in it "
                            "(config.json and diffusion_pytorch_model.safetensors or .bin)")
        return read_diffusers(weights, path)
    if not os.path.isfile(path):
        raise UserError(f"--import_weights {path!r} does not exist (a file, a diffusers folder, or one of "
                        f"{', '.join(PUBLISHED)})")
    tensors = read_tensors(path)
    if any(name.startswith("temb.dense.") for name in tensors):
        return ForeignWeights("pesser", tensors, path)
    if any(name.startswith("time_embedding.") for name in tensors):
        return read_diffusers(path, os.path.dirname(path), tensors)
    raise UserError(f"{path!r} holds neither Ho et al.'s network as pesser/pytorch_diffusion saves it (temb.dense.*) "
                    "nor a diffusers UNet2DModel (time_embedding.*)")


def read_diffusers(weights_path, root, tensors=None):
    """ForeignWeights of a diffusers UNet2DModel: weights, config.json beside them, and scheduler_config.json when
    there is one (beside them, or in root/scheduler/)."""
    folder = os.path.dirname(weights_path)
    config = read_json(os.path.join(folder, "config.json"), required=True)
    scheduler = next(filter(None, (read_json(os.path.join(where, "scheduler_config.json")) for where in
                                   (folder, os.path.join(root, "scheduler")))), None)
    return ForeignWeights("diffusers", tensors if tensors is not None else read_tensors(weights_path), weights_path,
                          config, scheduler)


def read_json(path, required=False):
    """A JSON file's object; None when it is absent and not required. UserError when it is not a JSON object."""
    if not os.path.isfile(path):
        if required:
            raise UserError(f"{os.path.dirname(path) or '.'} holds diffusers weights without their config.json")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # json's parser stops at the stack's depth
        raise UserError(f"{path!r} is not valid JSON, or nested too deep ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path!r} is not a JSON object")
    problem = nesting_problem(value, os.path.basename(path))
    if problem:
        raise UserError(f"{path!r}: {problem}")
    return value


def read_tensors(path):
    """A file's name → tensor dict, read without running code: safetensors, or torch.load(weights_only=True)."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path!r} is not a readable safetensors file ({type(e).__name__})") from None
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path!r} is not a readable weights file ({type(e).__name__}): it is damaged, or holds "
                            "more than tensors (weights_only loading refuses code)") from None
        if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
            tensors = tensors["state_dict"]
    if not isinstance(tensors, dict) or not tensors or not all(
            isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in tensors.items()):
        raise UserError(f"{path!r} is not a state dict (a dict of named tensors)")
    problem = weight_tensors_problem(tensors, "weights")  # integer weights are not cast: they were never trained
    if problem:
        raise UserError(f"{path!r}: {problem}")
    return tensors


# ------------------------------------------------------------------------------------ the network and names

def foreign_network(foreign):
    """The UNetConfig of a foreign network, its layout read from its tensors and, for diffusers, config.json."""
    names = foreign.tensors
    block = {"pesser": r"down\.(\d+)\.block\.(\d+)\.conv1\.weight",
             "diffusers": r"down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight"}[foreign.style]
    attention = {"pesser": r"down\.(\d+)\.attn\.", "diffusers": r"down_blocks\.(\d+)\.attentions\."}[foreign.style]
    blocks = {tuple(map(int, m.groups())): names[m.string] for m in map(re.compile(block).fullmatch, names) if m}
    conv_in = names.get("conv_in.weight")
    levels = 1 + max((i for i, _ in blocks), default=-1)
    if (conv_in is None or conv_in.dim() != 4 or not conv_in.shape[0] or not levels
            or not all((i, 0) in blocks for i in range(levels))):
        raise UserError(f"{foreign.source!r} lacks the down path of Ho et al.'s network (conv_in, the ResNet blocks)")
    dim, widths = conv_in.shape[0], [blocks[(i, 0)].shape[0] for i in range(levels)]
    side, groups, eps = PAPER_SIDE, PAPER_GROUPS, PAPER_EPS
    if foreign.style == "diffusers":
        side, groups, eps = diffusers_layout(foreign, levels)
    elif levels != 4:
        raise UserError(f"{foreign.source!r} has {levels} levels: pesser's CIFAR-10 network has 4 (the LSUN ones, "
                        "for 256 × 256 images, are not imported)")
    if any(w % dim for w in widths) or conv_in.shape[1] != 3 or dim % groups:
        raise UserError(f"{foreign.source!r} is not a 3-channel network whose widths are multiples of its first "
                        f"({dim}) and of its {groups} GroupNorm groups")
    attends = sorted({int(m.group(1)) for m in map(re.compile(attention).match, names) if m})
    return UNetConfig(dim=dim, dim_mults=tuple(w // dim for w in widths), channels=3, groups=groups, norm_eps=eps,
                      architecture="ddpm", num_res_blocks=1 + max(j for _, j in blocks), resblock="add",
                      attn_resolutions=tuple(side // 2 ** i for i in attends), dropout=PAPER_DROPOUT, image_size=side)


def diffusers_layout(foreign, levels):
    """(image side, GroupNorm groups, ε) of a diffusers UNet2DModel whose config.json describes Ho et al.'s layout."""
    config, source = foreign.unet_config, foreign.source
    problem = entries_problem(config, (), UNET_ENTRIES, "its config.json")
    if problem:
        raise UserError(f"{source!r}: {problem}")
    wrong = [f"{key} {config.get(key, default)!r} (Ho et al.: {value!r})"
             for key, (value, default) in DIFFUSERS_LAYOUT.items() if config.get(key, default) != value]
    down_types = config.get("down_block_types", [])
    if len(down_types) != levels or any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down_types):
        wrong.append(f"down_block_types {down_types!r}")
    mirrored = [t.replace("Down", "Up") for t in reversed(down_types)]
    if config.get("up_block_types") != mirrored:
        wrong.append(f"up_block_types {config.get('up_block_types')!r} (the down blocks mirrored: {mirrored!r})")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        wrong.append(f"_class_name {config['_class_name']!r}")
    if config.get("attention_head_dim", 8) is not None:
        wrong.append(f"attention_head_dim {config.get('attention_head_dim', 8)!r} (Ho et al.: null, one head)")
    if config.get("attn_norm_num_groups") not in (None, config.get("norm_num_groups", 32)):
        wrong.append(f"attn_norm_num_groups {config.get('attn_norm_num_groups')!r}")
    side = config.get("sample_size")
    if side != PAPER_SIDE or config.get("in_channels", 3) != 3 or config.get("out_channels", 3) != 3:
        wrong.append(f"sample_size {side!r} and channels {config.get('in_channels', 3)}→"
                     f"{config.get('out_channels', 3)} (CIFAR-10: 32, 3→3)")
    if wrong:
        raise UserError(f"{source!r}: its config.json is not Ho et al.'s CIFAR-10 layout: {'; '.join(wrong[:3])}")
    return side, config.get("norm_num_groups", 32), float(config.get("norm_eps", 1e-5))


def parameter_map(names, network, style, old_attention=False):
    """DDPMUNet's state-dict `names` (of `network`) → (the foreign names they come from, whether those are Linear
    layers where DDPMUNet has 1 × 1 convolutions). Three foreign names: q, k, v, stacked in DDPMUNet's to_qkv."""
    column = STYLES.index(style) + 1
    mapping = {}
    for name in names:
        match = KEY.fullmatch(name)
        module, part, param = match["module"], match["part"], match["param"]
        rule, found = next(((rule, m) for rule in MODULES if (m := re.fullmatch(rule[0], module))), (None, None))
        if rule is None:
            raise ValueError(f"no foreign name for {name}")  # a DDPMUNet module MODULES does not know: a bug
        groups = found.groupdict()
        if "k" in groups:
            groups["level"] = len(network.dim_mults) - 1 - int(groups["k"])
        prefix = rule[column].format(**groups)
        parts = PARTS.get(part, (part, part))[column - 1] if part else None
        parts = parts if isinstance(parts, tuple) else (parts,)
        if old_attention:
            parts = tuple(OLD_DIFFUSERS_ATTENTION.get(p, p) for p in parts)
        mapping[name] = ([".".join(filter(None, (prefix, p, param))) for p in parts],
                         style == "diffusers" and part in LINEAR_PARTS)
    return mapping


def foreign_shape(shape, count, linear):
    """The shape of each of `count` foreign tensors that make one DDPMUNet tensor of `shape` (stacked; a Linear's
    weight without the 1 × 1)."""
    shape = (shape[0] // count, *shape[1:])
    return shape[:2] if linear and len(shape) == 4 else shape


def import_weights(foreign):
    """Imported: the foreign network, its weights under DDPMUNet's names (float32), its diffusion; UserError naming
    the first tensor missing, extra or of another shape."""
    network = foreign_network(foreign)
    old = foreign.style == "diffusers" and any(".query." in name for name in foreign.tensors)
    with torch.device("meta"):
        expected = DDPMUNet(network).state_dict()  # names and shapes, nothing allocated
    mapping = parameter_map(expected, network, foreign.style, old)
    weights, used = {}, set()
    for name, (sources, linear) in mapping.items():
        parts = []
        for source in sources:
            want = foreign_shape(tuple(expected[name].shape), len(sources), linear)
            if source not in foreign.tensors:
                raise UserError(f"{foreign.source!r} lacks {source}, which Ho et al.'s network of its layout has")
            got = tuple(foreign.tensors[source].shape)
            if got != want:
                raise UserError(f"{foreign.source!r}: {source} is {'×'.join(map(str, got))}, Ho et al.'s network of "
                                f"its layout has {'×'.join(map(str, want))} there")
            parts.append(foreign.tensors[source].float().reshape(expected[name].shape[0] // len(sources),
                                                                 *expected[name].shape[1:]))
            used.add(source)
        weights[name] = torch.cat(parts) if len(parts) > 1 else parts[0]
    extra = sorted(set(foreign.tensors) - used)
    if extra:
        raise UserError(f"{foreign.source!r} holds {len(extra)} tensors Ho et al.'s network has no place for "
                        f"({', '.join(extra[:2])}{', …' if len(extra) > 2 else ''})")
    if not all(torch.isfinite(w).all() for w in weights.values()):
        raise UserError(f"{foreign.source!r} holds NaN or infinite weights")
    return Imported(network, weights, **foreign_diffusion(foreign))


def foreign_diffusion(foreign):
    """The diffusion a foreign network was trained with: scheduler_config.json's, else Ho et al.'s (T = 1000, linear
    β 1e-4 … 0.02, ε, σ_t² = β_t). UserError for values SCHEDULER_ENTRIES refuses or a β range the tool's schedule
    would not reproduce."""
    scheduler = foreign.scheduler
    if not scheduler:
        return {}
    problem = entries_problem(scheduler, (), SCHEDULER_ENTRIES, "its scheduler_config.json") or (
        None if scheduler.get("trained_betas") is None else
        "its scheduler_config.json has trained_betas, a schedule of its own (the tool's: linear, cosine, sigmoid)")
    if problem:
        raise UserError(f"{foreign.source!r}: {problem}")
    timesteps = scheduler.get("num_train_timesteps", 1000)
    schedule = SCHEDULE_NAMES[scheduler.get("beta_schedule", "linear")]
    ends = (scheduler.get("beta_start", 1e-4), scheduler.get("beta_end", 0.02))
    if schedule != "cosine" and not all(abs(a - b) < 1e-12 for a, b in zip(ends, scaled_beta_range(timesteps))):
        raise UserError(f"{foreign.source!r}: its scheduler_config.json's β runs from {ends[0]} to {ends[1]}; the "
                        f"tool's {schedule} schedule runs from 1e-4 to 0.02 at T = 1000, scaled by 1000/T")
    return {"timesteps": timesteps, "schedule": schedule,
            "prediction": PREDICTION_NAMES[scheduler.get("prediction_type", "epsilon")],
            "variance": VARIANCE_NAMES[scheduler.get("variance_type", "fixed_small")]}


# ------------------------------------------------------------------------------------------ writing

def export_problem(config, network):
    """Why a checkpoint's network has no diffusers twin (None: it has one): Ho et al.'s layout, unconditional."""
    if network.architecture != "ddpm" or network.resblock != "add":
        return ("is the compact U-Net, which has no diffusers twin: only Ho et al.'s layout (--architecture ddpm "
                "--resblock add, as --preset ddpm_cifar10 and imported models) exports")
    if network.num_classes is not None:
        return "is class-conditional: only unconditional networks export (UNet2DModel's class embedding is another)"
    return None


def diffusers_config(network):
    """config.json of the UNet2DModel that is DDPMUNet `network`."""
    widths = [network.dim * m for m in network.dim_mults]
    down = ["AttnDownBlock2D" if side in network.attention_sides() else "DownBlock2D"
            for side in network.stage_sides()]
    return {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": network.image_size,
            "in_channels": network.channels, "out_channels": network.channels, "block_out_channels": widths,
            "layers_per_block": network.num_res_blocks, "down_block_types": down,
            "up_block_types": [t.replace("Down", "Up") for t in reversed(down)], "attention_head_dim": None,
            "norm_num_groups": network.groups, "norm_eps": network.norm_eps, "dropout": network.dropout,
            **{key: value for key, (value, _) in DIFFUSERS_LAYOUT.items()}}


def scheduler_config(config):
    """scheduler_config.json of the DDPMScheduler that samples a checkpoint's diffusion as its config says."""
    schedule = {value: key for key, value in SCHEDULE_NAMES.items()}[config["schedule"]]
    beta_start, beta_end = scaled_beta_range(config["timesteps"])
    variance = config.get("sampling", {}).get("variance", "posterior")
    return {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": config["timesteps"], "beta_schedule": schedule, "beta_start": beta_start,
            "beta_end": beta_end, "trained_betas": None, "clip_sample": True, "clip_sample_range": 1.0,
            "prediction_type": {value: key for key, value in PREDICTION_NAMES.items()}[config.get("prediction", "eps")],
            "variance_type": {value: key for key, value in VARIANCE_NAMES.items()}[variance]}


def foreign_weights(network, weights, style="diffusers"):
    """A DDPMUNet state dict under pesser's or UNet2DModel's names, float32 and contiguous."""
    tensors = {}
    for name, (targets, linear) in parameter_map(weights, network, style).items():
        for target, chunk in zip(targets, weights[name].float().chunk(len(targets))):
            tensors[target] = chunk.reshape(foreign_shape(tuple(chunk.shape), 1, linear)).contiguous()
    return tensors


PIPELINE_INDEX = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                  "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


def diffusers_folder_files(config, network, weights):
    """{file name: bytes} of a DDPMPipeline folder laid out as google/ddpm-cifar10-32's."""
    from safetensors.torch import save
    as_json = lambda value: (json.dumps(value, indent=2) + "\n").encode()
    return {"model_index.json": as_json(PIPELINE_INDEX), "config.json": as_json(diffusers_config(network)),
            "diffusion_pytorch_model.safetensors": save(foreign_weights(network, weights), {"format": "pt"}),
            "scheduler_config.json": as_json(scheduler_config(config))}


def foreign_weights_path(source, verbose):
    """The file --import_weights names: a path as given, or a published file by name, fetched once (ddpm_download)."""
    if source in PUBLISHED:
        return fetched(PUBLISHED[source], progress=verbose and stderr_is_terminal(), verbose=verbose)
    if source == "ho2020-hub":
        raise UserError(f"{HUB_FOLDER} publishes no checksum to check a fetch by: download the folder by hand "
                        f"(huggingface-cli download {HUB_FOLDER} --local-dir ddpm-cifar10-32, or the files of "
                        f"https://huggingface.co/{HUB_FOLDER}) and pass it: --import_weights ddpm-cifar10-32")
    return source


# ------------------------------------------------------------------------------------------ the jobs

def import_job(options):
    """--import_weights: Ho et al.'s network from a file (fetched first when named) → <models_dir>/<run>/ckpt.pt
    and config.json."""
    verbose = not options.quiet
    path = foreign_weights_path(options.import_weights, verbose)
    foreign = read_foreign(path)
    imported = import_weights(foreign)
    run_name = options.run_name or sanitized_run_name(
        options.import_weights if options.import_weights in PUBLISHED else
        os.path.splitext(os.path.basename(os.path.normpath(path)))[0], fallback="imported")
    files = RunFiles(options.models_dir, options.save_dir, run_name)
    settings = sampler_settings(asked_sampling(options), SamplerSettings("ddpm", variance=imported.variance),
                                imported.timesteps, given=options.given)
    config = imported_config({**vars(options), "run_name": run_name}, imported, settings)
    target = files.checkpoint("ckpt.pt")
    make_way(files, files_read(options, JOB["import"]))
    write_new_run(files, imported_checkpoint(config, imported.weights, foreign.source), config, "an import")
    if verbose:
        count = sum(w.numel() for w in imported.weights.values())
        print(f"imported Ho et al.'s network ({count:,} parameters) from {foreign.source} "
              f"({FORMAT_NAMES[foreign.style]}) into {target}; it samples with "
              f"{describe_sampling(settings, guided=False)}. Sample it: python ddpm_main.py --inference --model_path "
              f"{target}"
              f"{FAST_SAMPLING if settings.sampler == 'ddpm' else ''}", file=sys.stderr)


FAST_SAMPLING = " (add --sampler dpm++2m --sampling_steps 15 for 15 network evaluations an image instead of 1,000)"


CIFAR10_TRAINED = {"dataset": "cifar10", "classes": CIFAR10_CLASSES, "channels": 3, "data_size": [32, 32],
                   "num_train": 50_000, "num_val": 0, "num_test": 10_000}  # what Ho et al. trained on: all 50,000


def imported_config(flags, imported, settings):
    """The config of an imported network: --preset ddpm_cifar10's recipe under the command line's `flags`, the file's
    network and diffusion, CIFAR-10's data, and the sampling settings."""
    recipe = {key: value for key, value in PRESETS["ddpm_cifar10"][1].items() if key in COMMAND_LINE_SETTINGS}
    chosen = {**{key: flags[key] for key in COMMAND_LINE_SETTINGS}, **recipe,
              **{key: flag_value(getattr(imported.network, key)) for key in MODEL_SETTINGS},
              "timesteps": imported.timesteps, "schedule": imported.schedule, "prediction": imported.prediction,
              "conditional": False, "data_dir": flags["data_dir"] or DEFAULT_DATA_DIR, "sampling": settings}
    return training_config(chosen, CIFAR10_TRAINED)


def check_export(options):
    """--export_diffusers DIR writes a new folder (Job.check): DIR must not exist, or be an empty folder."""
    folder = options.export_diffusers
    if os.path.exists(folder) and not (os.path.isdir(folder) and not os.listdir(folder)):
        raise UserError(f"--export_diffusers {folder!r} exists and is not an empty folder; name a new one")


def export_job(options):
    """--export_diffusers DIR: --model_path's network and EMA weights as a diffusers DDPMPipeline folder."""
    ckpt, _ = load_sampling_model(options.model_path)
    config = ckpt["config"]
    network = UNetConfig.from_dict(config["model"])
    problem = export_problem(config, network)
    if problem:
        raise UserError(f"--export_diffusers: {options.model_path!r} {problem}")
    write_folder(diffusers_folder_files(config, network, ckpt.get("ema") or ckpt["model"]), options.export_diffusers)
    if not options.quiet:
        print(f"wrote {options.export_diffusers}: {options.model_path}'s network as a diffusers DDPMPipeline "
              f"(UNet2DModel and DDPMScheduler); load it with diffusers.DDPMPipeline.from_pretrained("
              f"{options.export_diffusers!r})", file=sys.stderr)
