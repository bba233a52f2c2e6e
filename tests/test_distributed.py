"""torchrun with two CPU ranks (gloo): one set of outputs, disjoint shards, and the same run as one process, with
gradient accumulation on top (all-reduced on each step's last micro-batch only)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import MAIN, ROOT, make_image_folder, run_main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMMON = ["--conditional", "--seed", "3", "--dim", "8", "--dim_mults", "1,2", "--timesteps", "10", "--no_cuda",
          "--log_interval", "2", "--precision", "fp32"]  # fp32: the comparisons are to float32 round-off


def torchrun(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 40 training images → 36 train / 4 validation; 20 test: every split divides by 2 ranks
    return make_image_folder(str(tmp_path_factory.mktemp("ddp_data")), per_class_train=4, per_class_test=2)


SHARD_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
from ddpm_data import DeviceLoader
from ddpm_runtime import init_distributed
rank, world, _ = init_distributed(False)
loader = DeviceLoader(torch.zeros(50, 3, 2, 2, dtype=torch.uint8), torch.arange(50), 4, "cpu", seed=5,
                      rank=rank, world_size=world)
seen = [int(i) for _, y in loader.batches(epoch=2) for i in y]
json.dump(seen, open(f"rank{{rank}}.json", "w"))
"""


def test_ranks_see_disjoint_shards_covering_the_epoch(tmp_path):
    (tmp_path / "shard.py").write_text(SHARD_SCRIPT.format(root=ROOT))
    result = torchrun(["shard.py"], tmp_path)
    assert result.returncode == 0, result.stderr
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 25
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(50))


def test_two_ranks_accumulating_match_one_process_with_the_global_batch_and_resume(data, tmp_path):
    """2 ranks × 2 micro-batches of 2 = one process with batch 8: the same losses and weights."""
    first = torchrun([MAIN, "--data_dir", data, "--epochs", "1", "--batch_size", "2", "--grad_accum", "2",
                      "--run_name", "ddp", *COMMON], tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("training 'ddp'") == 1 and "2 ranks × batch 2" in first.stdout  # rank 0 prints
    assert "2 micro-batches of 2 per optimizer step on each of 2 ranks: 8 images a step" in first.stdout
    resumed = torchrun([MAIN, "--epochs", "2", "--run_name", "ddp", "--resume", "auto", "--save_model", "--no_cuda"],
                       tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    single = run_main("--data_dir", data, "--epochs", "2", "--batch_size", "8", "--run_name", "single",
                     "--save_model", *COMMON, cwd=tmp_path)
    assert single.returncode == 0, single.stderr

    ddp = json.loads((tmp_path / "outputs" / "loss_history_ddp.json").read_text())
    one = json.loads((tmp_path / "outputs" / "loss_history_single.json").read_text())
    assert ddp["epochs"] == one["epochs"] == [1, 2]
    for key in ("train_loss", "val_loss", "test_loss"):  # equal up to float32 reduction order
        assert ddp[key] == pytest.approx(one[key], rel=1e-4), key
    a = torch.load(tmp_path / "models" / "ddp" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "models" / "single" / "ckpt.pt", weights_only=True)
    for name in a["model"]:
        # Adam divides by √v: float32 round-off in near-zero gradients moves a weight by up to ~lr per step
        assert torch.allclose(a["model"][name], b["model"][name], atol=2e-3), name
    assert a["config"]["world_size"] == 2 and a["config"]["global_batch_size"] == 8 and a["step"] == b["step"]
    outputs = sorted(p.name for p in (tmp_path / "outputs").iterdir() if "ddp" in p.name)
    assert outputs == ["forward_process_ddp.png", "loss_curves_ddp.png", "loss_history_ddp.json", "metrics_ddp.json",
                       "samples_ddp_epoch001.png", "samples_ddp_epoch002.png"]
    assert json.loads((tmp_path / "outputs" / "metrics_ddp.json").read_text())["world_size"] == 2


def test_the_time_budget_is_checked_after_every_step_under_torchrun(data, tmp_path):
    """0.03 s, spent by the set-up: both ranks stop together after the first step, not at the first --log_interval
    read-out (here 100 steps)."""
    result = torchrun([MAIN, "--data_dir", data, "--epochs", "50", "--batch_size", "2", "--time_budget_min", "0.0005",
                       "--run_name", "budget", *COMMON, "--log_interval", "100"], tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "outputs" / "metrics_budget.json").read_text())
    assert metrics["steps"] == 1 and metrics["stopped_by_time_budget"] and metrics["world_size"] == 2
