"""The prepared GPU check: one command of at most 9 minutes on one H200 that runs the GPU half of the tool and writes
each part's log and results to --out as it goes, so a run killed at any point still returns what it did.

    bench/prepare_gpu_carry.sh                        # here: the data pack, Inception, the referee and
                                                      # torch-fidelity's wheel into .carry/
    python -u bench/gpu_check.py --out $OUT           # there, sent with carry [".carry"] (models/*.pt moved out)
    python -u bench/gpu_check.py --smoke --out DIR    # the same sequence on the CPU, tiny, in a minute or two

The parts, one after another, each with its own time limit (BENCHMARKS.md says which table each fills):

  1 speed     bench/bench.py at GPU sizes: seed-style pipeline, the fast path at each precision (the
              compile's warm-up timed apart), sampling                          1_speed.txt, 1_speed.json
  2 cli       ddpm_main.py as a newcomer runs it, on the real data: a one-minute run with --compile on
              (the budget holds the compile and the evaluation), then inference
              with each sampler                                                 2_cli.txt, 2_cli.json
  3 speedrun  bench/speedrun.py, conditional, its training sized to the time left: train, 10,000
              samples, the referee's FID, the bf16 export                       3_speedrun.txt, 3_speedrun.json,
                                                                                3_cifar10_cond_speedrun.pt,
                                                                                3_samples.png

Eight files, the most the device tool brings back. Everything else goes under --work (default /tmp/gpu_check).
There, torch-fidelity is imported from its carried wheel (the machine has no package registry), and the tool's
Inception weights are made from the referee's TorchScript (bench/referee_inception.py: .carry has no room for both).
--smoke: CPU, a generated image folder; the real network and the referee where ../shared or .carry has them, else a
random-weight stand-in of torch-fidelity's network and no referee.
"""
import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_S = 540                      # the whole check: 9 minutes, inside the device tool's 10 per command
CAP_S = {"speed": 170, "cli": 150}  # each part's limit; the speedrun gets what is left
SPEEDRUN_OVERHEAD_S = 170          # the speedrun's work beside training: compile, 10,000 samples, two FID reads
CARRY = {"data": "cifar10-jpeg.tar.xz", "net": "inception-2015-12-05-fp16.pt.xz", "referee": "referee_fid.py",
         "torch_fidelity": "torch_fidelity-*.whl"}
SPEED_ARGS = ["--batch_sizes", "512", "--big_batch_sizes", "256", "--steps", "30", "--warmup", "5",
              "--seed_steps", "60", "--workers", "8", "--sample_counts", "1000,10000", "--sample_batch", "5000"]
# the defaults a newcomer gets, with a time budget: evaluated once, at its end
CLI_TRAIN_ARGS = ["--time_budget_min", "1", "--epochs", "1000", "--eval_every", "1000", "--checkpoint_every", "1000",
                  "--compile", "on"]
SMOKE_CLI_TRAIN_ARGS = ["--time_budget_min", "0.02", "--epochs", "1000", "--eval_every", "1000",
                        "--checkpoint_every", "1000", "--dim", "8", "--dim_mults", "1,2", "--timesteps", "10",
                        "--batch_size", "8", "--no_cuda"]
SAMPLERS = ("dpm++2m", "ddim", "ddpm")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where the eight result files go ($OUT on the device machine)")
    p.add_argument("--work", default="/tmp/gpu_check", help="data, checkpoints and outputs that do not come back")
    p.add_argument("--carry", default=os.path.join(ROOT, ".carry"), help="what prepare_device_carry.sh filled")
    p.add_argument("--limit_s", type=float, default=LIMIT_S, help="the whole check's time limit in seconds")
    p.add_argument("--smoke", action="store_true", help="the same sequence on the CPU with tiny sizes")
    return p.parse_args()


def run_logged(command, log_path, timeout_s, env=None):
    """Run command (a list) with its output appended to log_path; returns (exit status, seconds). A command past
    timeout_s is killed (status 'timeout'): what it logged and wrote so far stays."""
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        try:
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=max(1, timeout_s),
                                    env=env).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
        seconds = time.perf_counter() - start
        log.write(f"[exit {status} after {seconds:.1f} s]\n")
    return status, seconds


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def smoke_data(folder):
    """A generated image folder: 10 classes of 16×16 images, 2 train and 1 test image each."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("test", 1)):
        for c in range(10):
            os.makedirs(os.path.join(folder, split, f"class{c}"), exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.integers(0, 255, 3) + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, split, f"class{c}", f"{i}.png"))
    return folder


def use_carried_torch_fidelity(carry):
    """torch-fidelity importable here and in the parts' processes: installed, or from its wheel in carry (a pure-Python
    wheel imports as it is, from sys.path / PYTHONPATH)."""
    if importlib.util.find_spec("torch_fidelity") is not None:
        return
    wheels = sorted(glob.glob(os.path.join(carry, CARRY["torch_fidelity"])))
    if not wheels:
        sys.exit(f"torch_fidelity is not installed and {carry} has no {CARRY['torch_fidelity']}: run "
                 "bench/prepare_gpu_carry.sh and send .carry")
    sys.path.insert(0, wheels[-1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [wheels[-1], os.environ.get("PYTHONPATH")]))


def prepare(a):
    """(the data folder, the tool's Inception weights, the referee's network, the referee) the parts use: from
    .carry on the GPU (the data pack unpacked once, the weights made from the referee's network), generated for
    --smoke (the real network where ../shared or .carry has it)."""
    use_carried_torch_fidelity(a.carry)
    from referee_inception import convert
    os.makedirs(a.work, exist_ok=True)
    weights = os.path.join(a.work, "inception-fidelity.pth")
    if a.smoke:
        found = {name: next((p for p in (os.path.join(os.path.dirname(ROOT), "shared", folder, CARRY[name]),
                                         os.path.join(a.carry, CARRY[name])) if os.path.isfile(p)), None)
                 for name, folder in (("net", "fid"), ("referee", "tools"))}
        if None in found.values():
            from ddpm_fid import write_random_inception
            return smoke_data(os.path.join(a.work, "data")), write_random_inception(weights), None, None
        return smoke_data(os.path.join(a.work, "data")), convert(found["net"], weights), found["net"], found["referee"]
    missing = [name for name in ("data", "net", "referee") if not os.path.isfile(os.path.join(a.carry, CARRY[name]))]
    if missing:
        sys.exit(f"{a.carry} lacks {', '.join(CARRY[m] for m in missing)}: run bench/prepare_gpu_carry.sh and send "
                 ".carry")
    data = os.path.join(a.work, "cifar10")
    if not os.path.isdir(os.path.join(data, "train")):
        with tarfile.open(os.path.join(a.carry, CARRY["data"])) as tar:
            tar.extractall(data, filter="data")
    net = os.path.join(a.carry, CARRY["net"])
    return data, convert(net, weights), net, os.path.join(a.carry, CARRY["referee"])


def part_speed(a, limit_s):
    """bench/bench.py at GPU sizes (or --smoke), its JSON rewritten after every row."""
    command = [sys.executable, "-u", "bench/bench.py", "--out", os.path.join(a.out, "1_speed.json"),
               *(["--smoke"] if a.smoke else SPEED_ARGS)]
    status, seconds = run_logged(command, os.path.join(a.out, "1_speed.txt"), limit_s)
    return {"status": status, "seconds": seconds}


def part_cli(a, data, limit_s):
    """The CLI end to end: training (a minute, compiled), then a 64-image inference with each sampler."""
    deadline, log, results = time.monotonic() + limit_s, os.path.join(a.out, "2_cli.txt"), {"commands": []}
    main = [sys.executable, "-u", "ddpm_main.py"]
    outputs = ["--save_dir", os.path.join(a.work, "cli")]
    train = [*main, "--data_dir", data, "--save_model", "--run_name", "gpu_cli", *outputs,
             "--models_dir", os.path.join(a.work, "models"), *(SMOKE_CLI_TRAIN_ARGS if a.smoke else CLI_TRAIN_ARGS)]
    model = os.path.join(a.work, "models", "gpu_cli", "ckpt.pt")
    commands = [("train", train)] + [(sampler, [*main, "--inference", "--model_path", model, "--sampler", sampler,
                                                "--run_name", f"gpu_cli_{sampler.replace('+', 'p')}", *outputs,
                                                *(["--num_samples", "4", "--no_cuda"] if a.smoke else [])])
                                     for sampler in SAMPLERS]
    for name, command in commands:
        status, seconds = run_logged(command, log, deadline - time.monotonic())
        results["commands"].append({"name": name, "command": " ".join(command[1:]), "status": status,
                                    "wall_s": seconds})
        if name == "train" and status == 0:
            with open(os.path.join(a.work, "cli", "metrics_gpu_cli.json")) as f:
                results["train_metrics"] = json.load(f)
        write_json(results, os.path.join(a.out, "2_cli.json"))
        if status != 0:
            break
    with open(log) as f:  # what the tool printed of each inference: "64 samples in 3.1 s on cuda: ..."
        results["sampling_s"] = [float(s) for s in re.findall(r"^\d+ samples in ([\d.]+) s on ", f.read(), re.M)]
    write_json(results, os.path.join(a.out, "2_cli.json"))
    return {"status": status, "seconds": sum(c["wall_s"] for c in results["commands"])}


def part_speedrun(a, data, weights, net, referee, limit_s):
    """bench/speedrun.py with the training minutes that fit limit_s, then its summary, export and grid copied out."""
    minutes = 0.01 if a.smoke else max(0.5, (limit_s - SPEEDRUN_OVERHEAD_S) / 60)
    folder = os.path.join(a.work, "speedrun")
    export = os.path.join(a.work, "cifar10_cond_speedrun.pt")
    command = [sys.executable, "-u", "bench/speedrun.py", "--data_dir", data, "--weights", weights, "--out", folder,
               "--export", export, "--minutes", f"{minutes:.2f}",
               *(["--referee", referee, "--net", net] if referee else []),
               *(["--smoke", "--num_fid", "10"] if a.smoke else [])]
    status, seconds = run_logged(command, os.path.join(a.out, "3_speedrun.txt"), limit_s)
    for source, target in ((os.path.join(folder, "summary_speedrun_cond.json"), "3_speedrun.json"),
                           (export, "3_cifar10_cond_speedrun.pt"),
                           (os.path.join(folder, "samples_speedrun_cond.png"), "3_samples.png")):
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(a.out, target))
    return {"status": status, "seconds": seconds, "minutes": minutes}


def main():
    a = parse_args()
    deadline = time.monotonic() + a.limit_s
    os.makedirs(a.out, exist_ok=True)
    data, weights, net, referee = prepare(a)
    print(f"gpu_check{' --smoke' if a.smoke else ''}: data {data}, referee {referee or 'none'}, "
          f"{a.limit_s:.0f} s in all", flush=True)
    left = lambda: deadline - time.monotonic()  # noqa: E731
    parts = {"speed": part_speed(a, min(CAP_S["speed"], left()))}
    print(f"1 speed: {parts['speed']}", flush=True)
    parts["cli"] = part_cli(a, data, min(CAP_S["cli"], left()))
    print(f"2 cli: {parts['cli']}", flush=True)
    parts["speedrun"] = part_speedrun(a, data, weights, net, referee, left())
    print(f"3 speedrun: {parts['speedrun']}", flush=True)
    for name in sorted(os.listdir(a.out)):
        print(f"  {name}: {os.path.getsize(os.path.join(a.out, name)):,} bytes")
    sys.exit(0 if all(part["status"] == 0 for part in parts.values()) else 1)


if __name__ == "__main__":
    main()
