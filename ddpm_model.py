"""The noise-prediction U-Net ε_θ(x_t, t, c) and its configuration."""
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
    attn_heads: int = 4
    attn_dim_head: int = 32

    def to_dict(self):
        d = asdict(self)
        d["dim_mults"] = list(self.dim_mults)
        return d

    @classmethod
    def from_dict(cls, d):
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["dim_mults"] = tuple(known.get("dim_mults", cls.dim_mults))
        return cls(**known)


class SinusoidalPosEmb(nn.Module):
    """Transformer sinusoidal embedding of the timestep index (Vaswani et al. 2017, §3.5)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None]               # (N, dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (N, dim)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, with FiLM (scale, shift) from the embedding before the second conv."""

    def __init__(self, dim_in, dim_out, emb_dim, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, dim_in)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out * 2))
        self.norm2 = nn.GroupNorm(groups, dim_out)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.film(emb), "n c -> n c 1 1").chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over all H·W positions, pre-norm, residual."""

    def __init__(self, dim, heads, dim_head, groups):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, dim)
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        q, k, v = (rearrange(p, "n (h d) x y -> n h (x y) d", h=self.heads)
                   for p in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)                   # (N, heads, H·W, dim_head)
        out = rearrange(out, "n h (x y) d -> n (h d) x y", x=h, y=w)
        return x + self.to_out(out)


class Downsample(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 4, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """ε-prediction U-Net: stages of two ResNet blocks (+ attention below full resolution), skips
    from every block of the down path to the up path, and a middle block with attention."""

    def __init__(self, config: UNetConfig = None, **kwargs):
        super().__init__()
        config = config or UNetConfig(**kwargs)
        self.config = config
        self.num_classes = config.num_classes
        dim, groups = config.dim, config.groups
        emb_dim = dim * 4
        dims = [dim * m for m in config.dim_mults]
        stage_io = list(zip([dim] + dims[:-1], dims))  # (in, out) channels per stage

        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        if config.num_classes is not None:
            self.class_emb = nn.Embedding(config.num_classes + 1, config.class_emb_dim)
            self.class_mlp = nn.Sequential(nn.Linear(config.class_emb_dim, emb_dim), nn.SiLU(),
                                           nn.Linear(emb_dim, emb_dim))

        def attention(d, stage):
            return Attention(d, config.attn_heads, config.attn_dim_head, groups) if stage > 0 else nn.Identity()

        self.init_conv = nn.Conv2d(config.channels, dim, 3, padding=1)
        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(stage_io):
            last = i == len(stage_io) - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(d_in, d_in, emb_dim, groups),
                ResnetBlock(d_in, d_in, emb_dim, groups),
                attention(d_in, i),
                nn.Conv2d(d_in, d_out, 3, padding=1) if last else Downsample(d_in, d_out),
            ]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, emb_dim, groups)
        self.mid_attn = Attention(mid, config.attn_heads, config.attn_dim_head, groups)
        self.mid_block2 = ResnetBlock(mid, mid, emb_dim, groups)
        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in reversed(list(enumerate(stage_io))):
            first = i == 0
            self.ups.append(nn.ModuleList([
                ResnetBlock(d_out + d_in, d_out, emb_dim, groups),
                ResnetBlock(d_out + d_in, d_out, emb_dim, groups),
                attention(d_out, i),
                nn.Conv2d(d_out, d_in, 3, padding=1) if first else Upsample(d_out, d_in),
            ]))
        self.final_block = ResnetBlock(dim * 2, dim, emb_dim, groups)
        self.final_conv = nn.Conv2d(dim, config.channels, 1)

    def forward(self, x, t, class_labels=None):
        """x: (N, C, H, W) noisy images; t: (N,) timestep indices; class_labels: (N,) or None.
        Returns the predicted noise ε, (N, C, H, W)."""
        emb = self.time_mlp(t)                                          # (N, 4·dim)
        if self.num_classes is not None:
            if class_labels is None:
                class_labels = torch.full_like(t, self.num_classes)     # null label: unconditional
            emb = emb + self.class_mlp(self.class_emb(class_labels))
        x = self.init_conv(x)                                           # (N, dim, H, W)
        residual = x
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, emb)
            skips.append(x)
            x = attn(block2(x, emb))
            skips.append(x)
            x = down(x)                                                 # (N, d_out, H/2, W/2)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, emb)), emb)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat([x, skips.pop()], dim=1), emb)
            x = attn(block2(torch.cat([x, skips.pop()], dim=1), emb))
            x = up(x)                                                   # (N, d_in, 2H, 2W)
        x = self.final_block(torch.cat([x, residual], dim=1), emb)
        return self.final_conv(x)
