"""Everything read back from a file is checked against its declaration before it is used: a checkpoint's config and
sampling settings (by the settings' own declarations, as their flags are), a last.pt's training state, the weights
(dense, strided, real floating point, on the CPU, the shapes the config implies), and the integrity digest every
checkpoint carries. A table per class of damage; each row is one line, exit status 2, nothing written."""
import copy
import math
import os
import sys

import pytest
import torch

from conftest import run_main
from ddpm_checkpoint import DIGEST_KEY, checkpoint_digest, load_checkpoint, save_checkpoint
from ddpm_helpers import UserError
from test_hostile_input import one_line_error, tree


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def first_weight(part, change):
    """A change to the first weight tensor of `part`."""
    def apply(ckpt):
        name = next(iter(ckpt[part]))
        ckpt[part][name] = change(ckpt[part][name])
    return apply


def holder(ckpt, keys):
    """The dict that holds ckpt[k1][k2]…[kn], kn its key."""
    for key in keys[:-1]:
        ckpt = ckpt[key]
    return ckpt


def set_in(*keys_and_value):
    """A change that sets ckpt[k1][k2]… = value."""
    *keys, value = keys_and_value
    return lambda ckpt: holder(ckpt, keys).__setitem__(keys[-1], value)


def delete(*keys):
    return lambda ckpt: holder(ckpt, keys).pop(keys[-1])


def save_damaged(source, change, path):
    """A copy of the checkpoint `source` changed by `change`, saved as a foreign tool would (no digest)."""
    ckpt = copy.deepcopy(torch.load(source, weights_only=True))
    ckpt.pop(DIGEST_KEY, None)
    change(ckpt)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # as a hostile writer might: torch.save recurses into nested entries
    try:
        torch.save(ckpt, path)
    finally:
        sys.setrecursionlimit(limit)


SAMPLE = ("uncond/ckpt.pt", ["--inference", "--model_path", "damaged.pt", "--num_samples", "2"])
SAMPLE_COND = ("cond/ckpt.pt", ["--inference", "--conditional", "--model_path", "damaged.pt", "--num_samples", "2"])
RESUME = ("cond/last.pt", ["--resume", "damaged.pt", "--epochs", "2"])

CHECKPOINT_CONTENTS = [
    ("guidance scale a string", SAMPLE, set_in("config", "sampling", "guidance_scale", "3"),
     "the config's sampling.guidance_scale is '3', not a number ≥ 0"),
    ("negative guidance scale", SAMPLE, set_in("config", "sampling", "guidance_scale", -2.0),
     "the config's sampling.guidance_scale is -2.0, not a number ≥ 0"),
    ("fractional step count", SAMPLE, set_in("config", "sampling", "steps", 2.5),
     "the config's sampling.steps is 2.5, not none or a whole number ≥ 1"),
    ("step count a string", SAMPLE, set_in("config", "sampling", "steps", "15"),
     "the config's sampling.steps is '15', not none or a whole number ≥ 1"),
    ("eta out of range", SAMPLE, set_in("config", "sampling", "eta", 7.0),
     "the config's sampling.eta is 7.0, not a number in [0, 1]"),
    ("unknown sampling entry", SAMPLE, set_in("config", "sampling", "order", 3),
     "the config's sampling holds order, not one of sampler, steps"),
    ("nested thousands deep", SAMPLE, set_in("config", "notes", nested(5000)),
     "the checkpoint's config is nested more than 32 deep"),
    ("image size of 1", SAMPLE, lambda c: (c["config"].update(image_size=1), c["config"]["model"].update(image_size=1)),
     "the config's image_size is 1, and its 2 stages need at least 2 pixels a side"),
    ("image sizes disagree", SAMPLE, set_in("config", "image_size", 32),
     "the config's image_size (32) and its model's (16) differ"),
    ("no class names", SAMPLE_COND, delete("config", "classes"), "the config lacks classes"),
    ("ema a tensor", SAMPLE, set_in("ema", torch.zeros(3)), "its ema weights are not a dict of tensors"),
    ("model a list", SAMPLE, set_in("model", [1, 2]), "its model weights are not a dict of tensors"),
    ("sparse weights", SAMPLE, first_weight("ema", lambda w: w.to_sparse()),
     "its ema weights hold time_mlp.1.weight as a sparse tensor, not a dense one"),
    ("complex weights", SAMPLE, first_weight("ema", lambda w: w.to(torch.complex64)),
     "its ema weights hold time_mlp.1.weight as torch.complex64, not real floating point"),
    ("integer weights", SAMPLE, first_weight("ema", lambda w: w.to(torch.int32)),
     "its ema weights hold time_mlp.1.weight as torch.int32, not real floating point"),
    ("raw weights integer", SAMPLE, first_weight("model", lambda w: w.to(torch.int64)),
     "its model weights hold time_mlp.1.weight as torch.int64, not real floating point"),
    ("meta weights", SAMPLE, first_weight("ema", lambda w: torch.empty_like(w, device="meta")),
     "its ema weights hold time_mlp.1.weight on the meta device, not in the file"),
]


@pytest.mark.parametrize("name,use,change,message", CHECKPOINT_CONTENTS, ids=[row[0] for row in CHECKPOINT_CONTENTS])
def test_checkpoint_contents_are_checked_by_their_declarations(name, use, change, message, trained, tmp_path):
    source, argv = use
    save_damaged(trained / "models" / source, change, tmp_path / "damaged.pt")
    before = tree(tmp_path)
    result = run_main(*argv, "--no_cuda", cwd=tmp_path)
    line = one_line_error(result)
    assert line.startswith("ddpm_main.py: error: 'damaged.pt' is damaged or incomplete: "), line
    assert message in line, line
    assert tree(tmp_path) == before


LAST_PT_STATE = [
    ("timing a string", set_in("timing", "train_s", "slow"),
     "the checkpoint's timing.train_s is 'slow', not a number ≥ 0"),
    ("timing NaN", set_in("timing", "wall_s", math.nan), "the checkpoint's timing.wall_s is nan, not a number ≥ 0"),
    ("timing a list", set_in("timing", [1.0]), "the checkpoint's timing is [1.0], not seconds per activity"),
    ("epoch fractional", set_in("epoch", 1.5), "the checkpoint's epoch is 1.5, not a whole number ≥ 0"),
    ("step a string", set_in("step", "4"), "the checkpoint's step is '4', not a whole number ≥ 0"),
    ("skipped steps negative", set_in("skipped_steps", -1), "the checkpoint's skipped_steps is -1, not a whole number"),
    ("best_val a string", set_in("best_val", "low"), "the checkpoint's best_val is 'low', not a number"),
    ("epoch_loss_sum NaN", set_in("epoch_loss_sum", math.nan), "the checkpoint's epoch_loss_sum is nan, not a number"),
    ("budget_spent a string", set_in("budget_spent", "yes"),
     "the checkpoint's budget_spent is 'yes', not true or false"),
    ("history lengths differ", lambda c: c["history"]["val_loss"].append(1.0),
     "the checkpoint's history holds lists of different lengths"),
    ("history losses strings", lambda c: c["history"].update(train_loss=["a"]),
     "the checkpoint's history.train_loss is ['a'], not a list of numbers"),
    ("optimizer lr a string", lambda c: c["optimizer"]["param_groups"][0].update(lr="fast"),
     "its optimizer's lr is 'fast', not a number ≥ 0"),
    ("optimizer betas wrong", lambda c: c["optimizer"]["param_groups"][0].update(betas=(0.9,)),
     "its optimizer's betas is (0.9,), not two numbers in [0, 1)"),
    ("optimizer eps negative", lambda c: c["optimizer"]["param_groups"][0].update(eps=-1.0),
     "its optimizer's eps is -1.0, not a number > 0"),
    ("optimizer moment integer", lambda c: c["optimizer"]["state"][0].update(
        exp_avg=c["optimizer"]["state"][0]["exp_avg"].long()), "its optimizer state of parameter 0 does not fit"),
    ("optimizer step a string", lambda c: c["optimizer"]["state"][0].update(step="3"),
     "its optimizer state of parameter 0 does not fit"),
    ("grad scaler a list", set_in("grad_scaler", [1]), "the checkpoint's grad_scaler is [1], not none or fp16's loss"),
    ("lr in config a string", set_in("config", "lr", "0.1"), "the config's lr is '0.1', not a number > 0"),
]


@pytest.mark.parametrize("name,change,message", LAST_PT_STATE, ids=[row[0] for row in LAST_PT_STATE])
def test_a_last_pt_state_is_checked_before_a_resume_uses_it(name, change, message, trained, tmp_path):
    source, argv = RESUME
    save_damaged(trained / "models" / source, change, tmp_path / "damaged.pt")
    before = tree(tmp_path)
    line = one_line_error(run_main(*argv, "--no_cuda", cwd=tmp_path))
    assert line.startswith("ddpm_main.py: error: 'damaged.pt' is damaged or incomplete: "), line
    assert message in line, line
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------- integrity

def flip_byte(path, where):
    data = bytearray(path.read_bytes())
    data[where(len(data))] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_checkpoint_written_carries_a_digest_of_its_contents(trained):
    for name in ("cond/last.pt", "cond/best.pt", "cond/ckpt.pt", "uncond/ckpt.pt"):
        ckpt = torch.load(trained / "models" / name, weights_only=True)
        assert ckpt[DIGEST_KEY] == checkpoint_digest(ckpt), name
        assert len(ckpt[DIGEST_KEY]) == 64


@pytest.mark.parametrize("where", [lambda n: n // 2, lambda n: n // 3, lambda n: 2 * n // 3],
                         ids=["middle", "a third in", "two thirds in"])
def test_a_flipped_byte_is_one_line_naming_the_file(where, trained, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((trained / "models" / "uncond" / "ckpt.pt").read_bytes())
    flip_byte(damaged, where)
    before = tree(tmp_path)
    line = one_line_error(run_main("--inference", "--model_path", "damaged.pt", "--num_samples", "2", "--no_cuda",
                                   cwd=tmp_path))
    assert line.startswith("ddpm_main.py: error: 'damaged.pt' "), line
    assert tree(tmp_path) == before


def test_a_digest_mismatch_names_the_file_and_says_what_to_do(trained, tmp_path):
    ckpt = torch.load(trained / "models" / "uncond" / "ckpt.pt", weights_only=True)
    name = next(iter(ckpt["ema"]))
    ckpt["ema"][name] = ckpt["ema"][name] + 1e-3  # a change no other check can see; the old digest kept
    torch.save(ckpt, tmp_path / "damaged.pt")
    with pytest.raises(UserError, match=r"'.*damaged.pt' is damaged: its contents differ from the digest it was "
                                        r"written with .*; use another copy or an earlier checkpoint"):
        load_checkpoint(str(tmp_path / "damaged.pt"))


def test_an_older_checkpoint_without_a_digest_loads_with_a_note(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "models" / "uncond" / "ckpt.pt", weights_only=True)
    del ckpt[DIGEST_KEY]
    torch.save(ckpt, tmp_path / "old.pt")
    load_checkpoint(str(tmp_path / "old.pt"))
    err = capsys.readouterr().err
    assert err.startswith("note: ") and "carries no digest" in err and len(err.splitlines()) == 1


def test_the_digest_covers_every_tensor_and_value_and_no_key_order(trained):
    ckpt = torch.load(trained / "models" / "cond" / "last.pt", weights_only=True)
    digest = checkpoint_digest(ckpt)
    reordered = dict(reversed(list(ckpt.items())))
    assert checkpoint_digest(reordered) == digest
    for change in (set_in("step", ckpt["step"] + 1), set_in("config", "lr", 0.5),
                   lambda c: c["optimizer"]["state"][0]["exp_avg"].view(-1)[0].add_(1),
                   lambda c: c["rng"]["cpu"].view(-1)[7].add_(1)):
        changed = copy.deepcopy(ckpt)
        change(changed)
        assert checkpoint_digest(changed) != digest


def test_save_checkpoint_records_the_digest_of_what_it_writes(trained, tmp_path):
    ckpt = torch.load(trained / "models" / "cond" / "last.pt", weights_only=True)
    save_checkpoint(ckpt, str(tmp_path / "best.pt"), with_optimizer=False)
    written = torch.load(tmp_path / "best.pt", weights_only=True)
    assert "optimizer" not in written and written[DIGEST_KEY] == checkpoint_digest(written)
    assert load_checkpoint(str(tmp_path / "best.pt"))["step"] == ckpt["step"]
    assert os.listdir(tmp_path) == ["best.pt"]
