"""The layout: ddpm_main.py is the top of the house. No module imports it (bench/ times the modules, never the CLI),
the modules import each other without a cycle, the jobs ddpm_jobs.py names exist, and only ddpm_main.py,
ddpm_config.py and ddpm_jobs.py (where every setting and job is declared) and ddpm_flags.py (the parser derived from
them) take the command line's `args`."""
import ast
import glob
import os

from conftest import ROOT


def parsed(path):
    return ast.parse(open(path).read())


def imported_modules(tree):
    """The names of the modules a module imports (top-level or inside functions)."""
    return ({alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)})


def project_modules():
    """{module name: the project modules it imports} for ddpm_*.py."""
    paths = sorted(glob.glob(os.path.join(ROOT, "ddpm_*.py")))
    names = {os.path.basename(path)[:-3] for path in paths}
    return {os.path.basename(path)[:-3]: imported_modules(parsed(path)) & names for path in paths}


def test_no_module_but_the_runners_imports_the_cli():
    """bench/bench.py times ddpm_train_step's step and ddpm_diffusion's sampler, not ddpm_main; only the scripts that
    run the CLI (speedrun, gpu_check by subprocess) reach it."""
    importers = [os.path.basename(path) for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))
                                                           + glob.glob(os.path.join(ROOT, "bench", "*.py")))
                 if not path.endswith("ddpm_main.py") and "ddpm_main" in imported_modules(parsed(path))]
    assert importers == ["speedrun.py"]


def test_the_modules_import_each_other_without_a_cycle():
    """Peeling off, again and again, the modules that import no module left: all are peeled (the bottom rooms first),
    and none imports ddpm_main."""
    left, order = project_modules(), []
    while left:
        ready = sorted(name for name, imports in left.items() if not imports & set(left))
        assert ready, f"an import cycle among {sorted(left)}"
        order += ready
        for name in ready:
            del left[name]
    assert "ddpm_main" in order and "ddpm_main" not in set().union(*project_modules().values())


def test_only_the_cli_takes_the_command_lines_args():
    """No function outside ddpm_main.py, ddpm_config.py, ddpm_jobs.py and ddpm_flags.py (the declarations and the
    parser made from them) has a parameter named args, and none imports argparse: the run, sampling and the lower
    modules take a config and the command line's options once read (ddpm_flags.Command)."""
    for path in sorted(glob.glob(os.path.join(ROOT, "ddpm_*.py"))):
        if path.endswith(("ddpm_main.py", "ddpm_config.py", "ddpm_jobs.py", "ddpm_flags.py")):
            continue
        tree = parsed(path)
        assert "argparse" not in imported_modules(tree), path
        takers = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                  and "args" in [a.arg for a in node.args.args + node.args.kwonlyargs]]
        assert not takers, f"{os.path.basename(path)}: {takers}"


def test_the_readme_names_every_module_in_its_layout():
    readme = open(os.path.join(ROOT, "README.md")).read()
    layout = readme[readme.index("## Layout"):]
    missing = [name for name in project_modules() if f"| `{name}.py` |" not in layout]
    assert not missing, f"README's layout lacks {missing}"


def test_every_job_names_functions_that_exist_and_its_flag_is_a_setting():
    """ddpm_jobs.JOBS names its functions as 'module.function' (imported when the job runs): each exists, and each
    job's flag, and every job a setting names, are declared."""
    from ddpm_config import BY_NAME, SECTION_JOBS, SETTINGS
    from ddpm_jobs import JOB, JOBS, function_named
    for job in JOBS:
        for path in filter(None, (job.run, job.banner, job.check)):
            assert callable(function_named(path)), path
        assert job.flag is None or job.flag in BY_NAME, job.name
    named = {name for setting in SETTINGS for name in setting.jobs} | set().union(*SECTION_JOBS.values())
    assert named <= set(JOB), named - set(JOB)
