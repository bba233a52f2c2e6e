"""The noise-prediction U-Nets ε_θ(x_t, t, c) and their configuration: this tool's compact U-Net (UNet) and Ho et
al.'s CIFAR-10 network (DDPMUNet, the paper's Appendix B and its published code), built by build_unet."""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class UNetConfig:
    dim: int = 32                  # channels of the first stage
    dim_mults: tuple = (1, 2, 4)   # channel multiplier per stage; each stage after the first halves H, W
    channels: int = 3              # image channels in and out
    num_classes: int = None        # None: unconditional; else labels 0..num_classes-1, num_classes = null label
    class_emb_dim: int = 128       # width of the class embedding before its MLP
    groups: int = 8                # GroupNorm groups
    norm_eps: float = 1e-5         # GroupNorm's ε (Ho et al.'s network: 1e-6; 1e-5 is torch's default and older
                                   # checkpoints')
    attn_heads: int = 4            # compact: heads × dim_head channels of attention (ddpm: one head, all channels)
    attn_dim_head: int = 32
    architecture: str = "compact"  # "compact": UNet, this tool's; "ddpm": DDPMUNet, Ho et al.'s
    num_res_blocks: int = 2        # ResNet blocks per stage on the way down (ddpm: one more on the way up)
    attn_resolutions: tuple = None  # sides whose stages get attention (None: every stage below the first)
    dropout: float = 0.0           # before each ResNet block's second convolution (Ho et al.: 0.1 on CIFAR-10)
    resblock: str = "film"         # how the embedding enters a ResNet block: "film" scale and shift after the second
                                   # norm, or "add": added after the first convolution (Ho et al.)
    image_size: int = None         # the side the network works on: where attn_resolutions fall

    def to_dict(self):
        d = asdict(self)
        d["dim_mults"] = list(self.dim_mults)
        if self.attn_resolutions is not None:
            d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d):
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["dim_mults"] = tuple(known.get("dim_mults", cls.dim_mults))
        if known.get("attn_resolutions") is not None:
            known["attn_resolutions"] = tuple(known["attn_resolutions"])
        return cls(**known)

    def stage_sides(self):
        """The side of each stage's images (image_size halved per stage), or None when image_size is not known."""
        return None if self.image_size is None else [self.image_size // 2 ** i for i in range(len(self.dim_mults))]

    def attends(self, stage):
        """Whether a stage gets attention: its side is in attn_resolutions, or (None) it is not the first stage."""
        if self.attn_resolutions is None:
            return stage > 0
        return bool(self.attn_resolutions) and self.stage_sides()[stage] in self.attn_resolutions

    def attention_sides(self):
        """The sides of the stages that get attention (attn_resolutions resolved; needs image_size)."""
        return tuple(side for stage, side in enumerate(self.stage_sides()) if self.attends(stage))


class SinusoidalPosEmb(nn.Module):
    """Transformer sinusoidal embedding of the timestep index (Vaswani et al. 2017, §3.5)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        """t (N,) → (N, dim), sin ‖ cos of t · 10000^(−i/(dim/2 − 1)), i = 0 … dim/2 − 1: in t's dtype when it is a
        floating one, else float32."""
        dtype = t.dtype if t.is_floating_point() else torch.float32
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=dtype) * (-math.log(10000) / (half - 1)))
        angles = t.to(dtype)[:, None] * freqs[None]             # (N, dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (N, dim)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, the embedding entering between them: FiLM (scale, shift) after the second
    GroupNorm, or (resblock "add", Ho et al.) added after the first conv; dropout before the second conv."""

    def __init__(self, dim_in, dim_out, emb_dim, groups, resblock="film", dropout=0.0, eps=1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, dim_in, eps)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        if resblock == "film":
            self.film = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out * 2))
        else:
            self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out))
        self.norm2 = nn.GroupNorm(groups, dim_out, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        if hasattr(self, "film"):
            scale, shift = rearrange(self.film(emb), "n c -> n c 1 1").chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + rearrange(self.emb_proj(emb), "n c -> n c 1 1"))
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over all H·W positions, pre-norm, residual."""

    def __init__(self, dim, heads, dim_head, groups, qkv_bias=False, eps=1e-5):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, dim, eps)
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=qkv_bias)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        q, k, v = (rearrange(p, "n (h d) x y -> n h (x y) d", h=self.heads)
                   for p in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)                   # (N, heads, H·W, dim_head)
        out = rearrange(out, "n h (x y) d -> n (h d) x y", x=h, y=w)
        return x + self.to_out(out)


class Downsample(nn.Module):
    """A 4 × 4 convolution of stride 2: half the side."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 4, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class StridedConvDownsample(nn.Module):
    """Ho et al.'s down-sampling: a 3 × 3 convolution of stride 2 after padding the right and bottom by one pixel
    (TensorFlow's 'SAME' padding, where the paper's network was written): half the side."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour doubling of the side, then a 3 × 3 convolution."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class NoisePredictor(nn.Module):
    """What both U-Nets share: their config, and the embedding every ResNet block takes: the timestep's sinusoidal
    embedding through an MLP (4 · dim wide), plus, for a class-conditional network, its class's (the null label
    num_classes when none is given)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        dim, emb_dim = config.dim, config.dim * 4
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        if config.num_classes is not None:
            self.class_emb = nn.Embedding(config.num_classes + 1, config.class_emb_dim)
            self.class_mlp = nn.Sequential(nn.Linear(config.class_emb_dim, emb_dim), nn.SiLU(),
                                           nn.Linear(emb_dim, emb_dim))

    def embed(self, t, class_labels=None, dtype=torch.float32):
        """t (N,), class_labels (N,) or None → the embedding (N, 4·dim), the sinusoids in `dtype` (the input's)."""
        emb = self.time_mlp(t.to(dtype))
        if self.num_classes is not None:
            if class_labels is None:
                class_labels = torch.full_like(t, self.num_classes)     # null label: unconditional
            emb = emb + self.class_mlp(self.class_emb(class_labels))
        return emb


class UNet(NoisePredictor):
    """This tool's compact ε-prediction U-Net: stages of num_res_blocks ResNet blocks (+ attention after the last
    where config.attends), the channels changing in the down- and up-sampling convolutions, skips from every block of
    the down path to the up path, a middle block with attention, and a last ResNet block on the first conv's output."""

    def __init__(self, config: UNetConfig = None, **kwargs):
        config = config or UNetConfig(**kwargs)
        super().__init__(config)
        dim, groups = config.dim, config.groups
        emb_dim = dim * 4
        dims = [dim * m for m in config.dim_mults]
        stage_io = list(zip([dim] + dims[:-1], dims))  # (in, out) channels per stage

        def attention(d, stage):
            return Attention(d, config.attn_heads, config.attn_dim_head, groups, eps=config.norm_eps) \
                if config.attends(stage) else nn.Identity()

        def block(d_in, d_out):
            return ResnetBlock(d_in, d_out, emb_dim, groups, config.resblock, config.dropout, config.norm_eps)

        self.init_conv = nn.Conv2d(config.channels, dim, 3, padding=1)
        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(stage_io):
            last = i == len(stage_io) - 1
            self.downs.append(nn.ModuleList([
                *(block(d_in, d_in) for _ in range(config.num_res_blocks)),
                attention(d_in, i),
                nn.Conv2d(d_in, d_out, 3, padding=1) if last else Downsample(d_in, d_out),
            ]))
        mid = dims[-1]
        self.mid_block1 = block(mid, mid)
        self.mid_attn = Attention(mid, config.attn_heads, config.attn_dim_head, groups, eps=config.norm_eps)
        self.mid_block2 = block(mid, mid)
        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in reversed(list(enumerate(stage_io))):
            first = i == 0
            self.ups.append(nn.ModuleList([
                *(block(d_out + d_in, d_out) for _ in range(config.num_res_blocks)),
                attention(d_out, i),
                nn.Conv2d(d_out, d_in, 3, padding=1) if first else Upsample(d_out, d_in),
            ]))
        self.final_block = block(dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, config.channels, 1)

    def forward(self, x, t, class_labels=None):
        """x: (N, C, H, W) noisy images; t: (N,) timestep indices; class_labels: (N,) or None.
        Returns the predicted noise ε, (N, C, H, W)."""
        emb = self.embed(t, class_labels, x.dtype)                      # (N, 4·dim)
        x = self.init_conv(x)                                           # (N, dim, H, W)
        residual = x
        skips = []
        for *blocks, attn, down in self.downs:
            for i, block in enumerate(blocks):
                x = block(x, emb)
                x = attn(x) if i == len(blocks) - 1 else x
                skips.append(x)
            x = down(x)                                                 # (N, d_out, H/2, W/2)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, emb)), emb)
        for *blocks, attn, up in self.ups:
            for i, block in enumerate(blocks):
                x = block(torch.cat([x, skips.pop()], dim=1), emb)
                x = attn(x) if i == len(blocks) - 1 else x
            x = up(x)                                                   # (N, d_in, 2H, 2W)
        x = self.final_block(torch.cat([x, residual], dim=1), emb)
        return self.final_conv(x)


class DDPMUNet(NoisePredictor):
    """Ho et al.'s U-Net (2020, Appendix B; the layout of their published code): stages of num_res_blocks ResNet
    blocks that change the channels in their first block, attention after every block of a stage whose side is in
    attn_resolutions (one head over all channels), 3 × 3 strided down-sampling; skips from the first conv, every
    block and every down-sampling to the up path, whose stages have one block more; GroupNorm → SiLU → 3 × 3 conv out.
    With dim 128, dim_mults 1,2,2,2, 2 blocks, attention at 16 and resblock "add": the paper's 35.7M-parameter
    CIFAR-10 network."""

    def __init__(self, config: UNetConfig = None, **kwargs):
        config = config or UNetConfig(architecture="ddpm", **kwargs)
        super().__init__(config)
        dim, groups = config.dim, config.groups
        emb_dim = dim * 4
        dims = [dim * m for m in config.dim_mults]

        def block(d_in, d_out):
            return ResnetBlock(d_in, d_out, emb_dim, groups, config.resblock, config.dropout, config.norm_eps)

        def attention(d, stage):
            return Attention(d, 1, d, groups, True, config.norm_eps) if config.attends(stage) else nn.Identity()

        self.init_conv = nn.Conv2d(config.channels, dim, 3, padding=1)
        skip_channels, d_in = [dim], dim                # what each skip holds, in the order they are made
        self.downs = nn.ModuleList()
        for i, d_out in enumerate(dims):
            stage = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stage.append(nn.ModuleList([block(d_in, d_out), attention(d_out, i)]))
                skip_channels.append(d_out)
                d_in = d_out
            self.downs.append(nn.ModuleList([stage, StridedConvDownsample(d_out) if i < len(dims) - 1
                                             else nn.Identity()]))
            if i < len(dims) - 1:
                skip_channels.append(d_out)
        self.mid_block1 = block(d_in, d_in)
        self.mid_attn = Attention(d_in, 1, d_in, groups, True, config.norm_eps)
        self.mid_block2 = block(d_in, d_in)
        self.ups = nn.ModuleList()
        for i, d_out in reversed(list(enumerate(dims))):
            stage = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stage.append(nn.ModuleList([block(d_in + skip_channels.pop(), d_out), attention(d_out, i)]))
                d_in = d_out
            self.ups.append(nn.ModuleList([stage, Upsample(d_out, d_out) if i > 0 else nn.Identity()]))
        self.out = nn.Sequential(nn.GroupNorm(groups, d_in, config.norm_eps), nn.SiLU(),
                                 nn.Conv2d(d_in, config.channels, 3, padding=1))

    def forward(self, x, t, class_labels=None):
        """x: (N, C, H, W) noisy images; t: (N,) timestep indices; class_labels: (N,) or None.
        Returns the predicted noise ε, (N, C, H, W)."""
        emb = self.embed(t, class_labels, x.dtype)                      # (N, 4·dim)
        skips = [self.init_conv(x)]                                     # (N, dim, H, W)
        for stage, down in self.downs:
            for block, attn in stage:
                skips.append(attn(block(skips[-1], emb)))
            if not isinstance(down, nn.Identity):
                skips.append(down(skips[-1]))                           # (N, d, H/2, W/2)
        x = self.mid_block2(self.mid_attn(self.mid_block1(skips[-1], emb)), emb)
        for stage, up in self.ups:
            for block, attn in stage:
                x = attn(block(torch.cat([x, skips.pop()], dim=1), emb))
            x = up(x)                                                   # (N, d, 2H, 2W)
        return self.out(x)


ARCHITECTURES = {"compact": UNet, "ddpm": DDPMUNet}
RESBLOCKS = ("film", "add")


def build_unet(config: UNetConfig):
    """The network a UNetConfig describes, freshly initialised: UNet or DDPMUNet, as config.architecture says."""
    return ARCHITECTURES[config.architecture](config)
