"""torch-fidelity's Inception weights file made from the referee's TorchScript of the same network, for the GPU
machine: it receives only the checkout and .carry (64 MiB in all), which holds the referee's TorchScript (39 MB) and
the data (18 MB) but has no room for the 52 MB torch-fidelity copy in ../shared/fid too.

    python bench/referee_inception.py .carry/inception-2015-12-05-fp16.pt.xz /tmp/inception-fidelity.pth

The two files hold the same 94 convolutions in the same order: the TorchScript keeps each as (weight, beta, mean,
var), torch-fidelity as conv.weight and a BatchNorm whose scale is 1 (TF's Inception has none). The TorchScript has no
classifier layer, so fc is NaN, as in ../shared's copy: FID works, IS does not. The result equals
../shared/fid/inception-2015-12-05-torch-fidelity-fp16w.pth tensor for tensor (tests/test_gpu_check.py).
"""
import io
import lzma
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_fid import random_inception  # noqa: E402

FC_SHAPE = (1008, 2048)  # torch-fidelity's classifier: 1008 classes of the 2048 pool features


def torchscript_weights(path):
    """The TorchScript's state dict (.xz accepted), in its order."""
    with open(path, "rb") as f:
        raw = f.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        net = torch.jit.load(io.BytesIO(lzma.decompress(raw) if path.endswith(".xz") else raw), map_location="cpu")
    return net.state_dict()


def fidelity_state_dict(script_weights, conv_names):
    """torch-fidelity's state dict from the TorchScript's, conv_names its convolutions' prefixes in order (e.g.
    'Conv2d_1a_3x3', 'Mixed_5b.branch1x1', …)."""
    convs = [name[:-len(".weight")] for name in script_weights if name.endswith(".weight")]
    if len(convs) != len(conv_names):
        raise ValueError(f"the TorchScript holds {len(convs)} convolutions, torch-fidelity's network {len(conv_names)}")
    state = {}
    for ours, theirs in zip(conv_names, convs):
        beta = script_weights[f"{theirs}.beta"]
        state.update({f"{ours}.conv.weight": script_weights[f"{theirs}.weight"],
                      f"{ours}.bn.weight": torch.ones_like(beta), f"{ours}.bn.bias": beta,
                      f"{ours}.bn.running_mean": script_weights[f"{theirs}.mean"],
                      f"{ours}.bn.running_var": script_weights[f"{theirs}.var"],
                      f"{ours}.bn.num_batches_tracked": torch.tensor(0)})
    state["fc.weight"] = torch.full(FC_SHAPE, float("nan"))
    state["fc.bias"] = torch.full(FC_SHAPE[:1], float("nan"))
    return state


def fidelity_conv_names():
    """The prefixes of torch-fidelity's Inception convolutions, in its state dict's order."""
    return [name[:-len(".conv.weight")] for name in random_inception().state_dict() if name.endswith(".conv.weight")]


def convert(script_path, out_path):
    torch.save(fidelity_state_dict(torchscript_weights(script_path), fidelity_conv_names()), out_path)
    return out_path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(convert(sys.argv[1], sys.argv[2]))
