"""The 5-minute speedrun: train on CIFAR-10 for a fixed training-time budget, sample 10,000 images,
and read their FID with the referee — all in this one process.

    python bench/speedrun.py --data_dir /tmp/cifar10 --referee .carry/referee_fid.py \\
        --net .carry/inception-2015-12-05-fp16.pt.xz [--weights inception-fidelity.pth] [--unconditional]

--data_tar unpacks the image-folder pack first (../shared/data/cifar10-jpeg.tar.xz) when --data_dir has
no train/. Training time excludes decoding and compilation (ddpm_main.py --time_budget_min). The
referee (its TorchScript --net) reads the FID of the very samples ddpm_main.py wrote (fid_samples_<run>.npz) against
--ref_stats, or against the training images when no stats are given; the tool reads them with its Inception weights
(--weights, default: fetched). With --export, the EMA weights
go to a small bf16 inference checkpoint. --smoke shrinks everything to run in seconds on CPU.
"""
import argparse
import importlib.util
import json
import os
import sys
import tarfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ddpm_main  # noqa: E402
from ddpm_checkpoint import export_for_inference, load_checkpoint  # noqa: E402
from ddpm_config import preset_flags  # noqa: E402
from ddpm_data import load_dataset  # noqa: E402
from ddpm_helpers import RunFiles  # noqa: E402

# The recipe is ddpm_presets.SPEEDRUN (ddpm_main.py --preset speedrun); the smoke run shrinks its sizes.
TRAIN_ARGS = ["--preset", "speedrun"]
SAMPLE_ARGS = ["--sample_batch", "2500"]  # the sampler is the checkpoint's: the default, at --guidance_scale
SMOKE_TRAIN_ARGS = ["--preset", "speedrun", "--dim", "8", "--dim_mults", "1,2", "--batch_size", "8", "--timesteps",
                    "10", "--no_cuda"]
SMOKE_SAMPLE_ARGS = ["--sample_batch", "50"]


def load_referee(path):
    spec = importlib.util.spec_from_file_location("referee_fid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_referee_fid(a, device, samples_path):
    """The referee's FID of the samples at samples_path against --ref_stats, or the training images."""
    referee = load_referee(a.referee)
    features = referee.FidFeatures(a.net, device)
    mu, sigma = features.stats(referee.load_images(samples_path))
    if a.ref_stats:
        mu_ref, sigma_ref = referee.load_ref(a.ref_stats)
    else:
        mu_ref, sigma_ref = features.stats(load_dataset(a.data_dir)["train_images"].permute(0, 2, 3, 1).numpy())
    return referee.frechet(mu, sigma, mu_ref, sigma_ref)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="/tmp/cifar10", help="image-folder CIFAR-10 (train/, test/)")
    p.add_argument("--data_tar", help="unpack this .tar.xz into --data_dir first when train/ is missing")
    p.add_argument("--weights", help="the tool's Inception weights (--fid_inception; default: fetched)")
    p.add_argument("--referee", help="referee_fid.py (without it, only the project's FID is read: a smoke run's)")
    p.add_argument("--net", help="the referee's TF-Inception TorchScript (.pt.xz)")
    p.add_argument("--ref_stats", help="reference statistics npz for the referee (default: the training images)")
    p.add_argument("--unconditional", action="store_true", help="train without labels (default: conditional + CFG)")
    p.add_argument("--minutes", type=float, default=5.0, help="the training run's budget (--time_budget_min: the whole run, its final losses, grid "
                   "and checkpoints included)")
    p.add_argument("--guidance_scale", type=float, default=1.5,
                   help="CFG w the checkpoint (and the export) carries, and the FID samples use")
    p.add_argument("--num_fid", type=int, default=10000, help="samples for FID")
    p.add_argument("--out", default="outputs/speedrun", help="outputs, checkpoints and the summary JSON")
    p.add_argument("--export", help="write the EMA weights (bf16) as an inference checkpoint here")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes on CPU: checks the pipeline")
    return p


def unpack_data(data_dir, data_tar):
    """Unpack the image-folder pack data_tar into data_dir unless data_dir already holds train/."""
    if not os.path.isdir(os.path.join(data_dir, "train")):
        if not data_tar:
            sys.exit(f"{data_dir} has no train/: give --data_tar to unpack the image-folder pack")
        os.makedirs(data_dir, exist_ok=True)
        with tarfile.open(data_tar) as tar:
            tar.extractall(data_dir, filter="data")


def main():
    parser = build_parser()
    a = parser.parse_args()
    if a.referee and not a.net:
        parser.error("--referee reads FID with its own network: give --net too")
    start = time.perf_counter()
    unpack_data(a.data_dir, a.data_tar)
    unpack_s = time.perf_counter() - start

    name = "speedrun_uncond" if a.unconditional else "speedrun_cond"
    models_dir = os.path.join(a.out, "models")
    train_args, sample_args = (SMOKE_TRAIN_ARGS, SMOKE_SAMPLE_ARGS) if a.smoke else (TRAIN_ARGS, SAMPLE_ARGS)
    common = ["--run_name", name, "--save_dir", a.out, "--models_dir", models_dir]
    conditional = [] if a.unconditional else ["--conditional"]
    ddpm_main.main(["--data_dir", a.data_dir, "--epochs", "100000", "--time_budget_min", str(a.minutes),
                    "--save_model", "--guidance_scale", str(a.guidance_scale), *conditional, *train_args, *common])
    files = RunFiles(models_dir, a.out, name)  # where the tool wrote the run's files
    train_metrics = json.load(open(files.output("metrics")))
    ckpt_path = files.checkpoint("ckpt.pt")

    t0 = time.perf_counter()
    weights = ["--fid_inception", a.weights] if a.weights else []
    ddpm_main.main(["--inference", "--model_path", ckpt_path, "--num_samples", "100", "--eval_fid", str(a.num_fid),
                    *weights, "--data_dir", a.data_dir, *conditional, *sample_args, *common[:4]])
    ours = json.load(open(files.output("metrics")))
    sample_fid_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    referee_fid = read_referee_fid(a, device, files.output("fid_samples")) if a.referee else None
    referee_s = time.perf_counter() - t0

    if a.export:
        export_for_inference(load_checkpoint(ckpt_path), a.export)
    summary = {
        "run": name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
        "train_args": train_args, "preset": preset_flags("speedrun"), "sample_args": sample_args,
        "sampler": ours["fid_sampler"],
        "referee_fid": referee_fid, "project_fid": ours["fid"], "num_fid": a.num_fid,
        **{name: ours[name] for name in ("fid_second_draw", "kid", "kid_std", "prc_precision", "prc_recall", "copy_share",
                                         "copy_share_pixels")},
        "inception_score": ours["inception_score"], "fid_protocol": ours["fid_protocol"],
        "num_params": train_metrics["num_params"], "steps": train_metrics["steps"],
        "precision": train_metrics["precision"], "compiled": train_metrics["compiled"],
        "epochs": train_metrics["epochs_done"], "train_images_per_s": train_metrics["train_images_per_s"],
        "time_s": {"unpack": unpack_s, **train_metrics["timing"], "sample_and_project_fid": sample_fid_s,
                   "referee": referee_s, "total": time.perf_counter() - start},
        "exported": a.export,
    }
    with open(os.path.join(a.out, f"summary_{name}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    referee_text = f"referee FID {referee_fid:.3f}" if referee_fid is not None else "no referee given"
    print(f"{referee_text} (n={a.num_fid}); project FID {ours['fid']:.3f} ± {ours['fid_second_draw']:.3f} (where a "
          f"second draw lands); total {summary['time_s']['total']:.0f} s")


if __name__ == "__main__":
    main()
