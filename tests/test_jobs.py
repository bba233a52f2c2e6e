"""The jobs table (ddpm_jobs.JOBS): which job a command asks for, the flag rules derived from it, and what adding a job
takes."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SHIPPED
from ddpm_flags import job_asked
from ddpm_helpers import UserError


@pytest.mark.parametrize("given, job", [
    (set(), "train"), ({"resume"}, "train"), ({"inference", "model_path"}, "sample"),
    ({"inference", "model_path", "eval_fid"}, "fid"), ({"eval_fid"}, "train"), ({"eval_nll"}, "train"),
    ({"inference", "model_path", "inpaint", "images"}, "inpaint"), ({"import_weights"}, "import"),
    ({"export_diffusers", "model_path"}, "export"),
])
def test_the_job_asked_is_the_one_whose_flag_is_given(given, job):
    assert job_asked(given).name == job


@pytest.mark.parametrize("given, message", [
    ({"inference"}, "--inference needs --model_path"),
    ({"inference", "model_path", "invert", "eval_nll"}, "--eval_nll and --invert are separate jobs at --inference"),
    ({"import_weights", "export_diffusers", "model_path"}, "--import_weights and --export_diffusers are separate jobs"),
])
def test_two_jobs_or_a_missing_model_are_refused(given, message):
    with pytest.raises(UserError, match=message):
        job_asked(given)


def add_line(path, before, line):
    """`line` inserted into the file at path before the first line that starts with `before`."""
    text = path.read_text()
    at = text.index(before)
    path.write_text(text[:at] + line + text[at:])


# what a contributor writes for a job: its Job, its flag's Setting and the function the Job names
NEW_JOB = '    Job("noise", "noise_grid", "noise_job.draw", "drawing noise", **OF_A_MODEL),\n'
NEW_FLAG = '    S("noise_grid", "inference", "one grid of x_T", False, bool),\n'
NEW_FUNCTION = '''def draw(options, sampler, files, classes):
    print(f"x_T of {files.run_name}: {sampler.settings.steps} steps, classes {classes}")
'''
RUNS = '''import sys
import ddpm_main
for argv in ({commands}):
    try:
        ddpm_main.main(argv)
    except SystemExit as e:
        print("exit", e.code, file=sys.stderr)
'''


def test_a_new_job_is_one_entry_its_flag_and_its_function(tmp_path):
    """In a copy of the modules with the three written, the new flag stands in --help's group of its section, goes
    with --inference, is one job per command, takes only the flags that do something in it, and runs its function
    after a banner in its own words with the checkpoint's sampler and the classes asked."""
    for path in glob.glob(os.path.join(ROOT, "ddpm_*.py")):
        shutil.copy(path, tmp_path)
    add_line(tmp_path / "ddpm_jobs.py", '    Job("import"', NEW_JOB)
    add_line(tmp_path / "ddpm_config.py", '    S("guidance_sweep"', NEW_FLAG)
    (tmp_path / "noise_job.py").write_text(NEW_FUNCTION)
    commands = [["--help"], ["--noise_grid"], ["--inference", "--model_path", SHIPPED, "--noise_grid", "--invert"],
                ["--inference", "--model_path", SHIPPED, "--noise_grid", "--frames", "3"],
                ["--inference", "--model_path", SHIPPED, "--noise_grid", "--conditional", "--sample_classes", "cat",
                 "--sampling_steps", "7", "--no_cuda"]]
    result = subprocess.run([sys.executable, "-c", RUNS.format(commands=commands)], cwd=tmp_path, text=True,
                            capture_output=True, timeout=300)
    help_text = result.stdout.split("\ninference:\n")[1].split("\n\n")[0]
    assert "--noise_grid" in help_text and "one grid of x_T" in help_text
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert "--noise_grid goes with --inference" in errors[0]
    assert "--invert and --noise_grid are separate jobs at --inference" in errors[1]
    assert "--frames does nothing in --noise_grid (it is for --interpolate)" in errors[2]
    assert result.stderr.count("exit 2") == 3 and "Traceback" not in result.stderr
    assert "drawing noise on cpu in " in result.stdout and "dpm++2m, 7 steps" in result.stdout
    assert "x_T of cifar10_cond_speedrun: 7 steps, classes [3]" in result.stdout
