"""The command line, derived from the settings ddpm_config.py and the jobs ddpm_jobs.py declare: the parser (a flag per
Setting, grouped by section), which flags were given, presets filled in, the job asked, the checks of the numbers, of
the flags' jobs and of their paths, the old synonyms, and docs/flags.md (`python ddpm_flags.py > docs/flags.md`)."""
import argparse
import math

from ddpm_config import FLAGS, READS, RESUME_WORDS, SAMPLING, SYNONYMS, WRITES, flag_text, preset_flags
from ddpm_helpers import UserError, check_run_name, check_writable_folder, input_file_problem
from ddpm_jobs import INFERENCE, JOB, JOBS, Item, function_named
from ddpm_presets import PRESETS


# (title, description) of the groups --help shows, in its order
SECTIONS = {
    "training": ("training", None),
    "diffusion": ("diffusion", None),
    "network": ("network (the U-Net)", None),
    "data": ("data", None),
    "files": ("files, checkpoints and logs", None),
    "inference": ("inference", None),
    "editing": ("editing real images (inference, instead of sampling)", None),
    "sampling": ("sampling (inference, the per-epoch grids and FID)",
                 "A checkpoint carries its sampling settings; these flags override them."),
    "evaluation": ("evaluation: FID, Inception Score and the bound", None),
    "foreign": ("foreign weights (docs/paper.md)", None),
    "machine": ("machine", None),
}


class Command(argparse.Namespace):
    """The command line once read (parsed, checked, synonyms resolved, torchrun's rank added): the flags' values by
    name, never changed afterwards."""

    def __init__(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"the command line is read once: --{name} cannot change")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, the message and a pointer to --help (no usage block); exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, each flag's default after its help, a help column wide enough for long flags."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=26)

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


USAGE = "%(prog)s [--inference --model_path CKPT | --resume PATH | --import_weights X] [flags]"


def build_parser(description=None, version=None):
    """The command line: a flag per Setting (but world_size), grouped by SECTIONS; --version says `version`."""
    parser = ArgumentParser(prog="ddpm_main.py", usage=USAGE, description=description,
                            formatter_class=HelpFormatter, allow_abbrev=False)  # --epoch is not --epochs
    if version:
        parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    groups = {key: parser.add_argument_group(title, text) for key, (title, text) in SECTIONS.items()}
    for setting in FLAGS:
        help_text = argparse.SUPPRESS if setting.hidden else setting.help.replace("%", "%%")
        if setting.parse is bool:
            groups[setting.section].add_argument(f"--{setting.name}", action="store_true", help=help_text)
            continue
        groups[setting.section].add_argument(f"--{setting.name}", type=setting.parse, default=setting.default,
                                             choices=setting.choices, metavar=setting.metavar, help=help_text)
    return parser


def flags_given(parser, args, argv):
    """The flags (dests) given on the command line: argv parsed again into a namespace already holding every entry,
    so argparse fills in no default."""
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return frozenset(name for name, value in vars(given).items() if value is not unset)


def parse_command_line(parser, argv):
    """argv's flags, those a --preset names (ddpm_presets) filling in the ones not given: a new training run's."""
    args = parser.parse_args(argv)
    if args.preset is not None:
        if args.inference or args.resume is not None:
            parser.error("--preset sets up a new training run; a resumed run keeps its checkpoint's settings, and "
                         "inference samples with the checkpoint's")
        parser.set_defaults(**PRESETS[args.preset][1])
        args = parser.parse_args(argv)
    return args


def check_command(parser, args):
    """Reject bad input before anything is read or written (one line, exit status 2): numbers, the job asked, the flags
    it takes and their paths, then Job.check. Returns the job."""
    try:
        check_numbers(args)
        args.given = resolve_synonyms(args, args.given)
        job = job_asked(args.given)
        check_flags_apply(args, args.given, job)
        check_paths(args, job)
        if job.check:
            function_named(job.check)(args)
    except UserError as e:
        parser.error(str(e))
    return job


def check_numbers(args):
    """Every number finite and in its Setting's range; the U-Net's width one its GroupNorm can divide."""
    for name, value in vars(args).items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise UserError(f"--{name} must be finite, got {value}")
    for setting in FLAGS:
        value = getattr(args, setting.name)
        if setting.check is None or value is None:
            continue
        if isinstance(value, list):
            if not all(map(setting.check.holds, value)):
                raise UserError(f"--{setting.name} must each be {setting.check.phrase()}, got {flag_text(value)}")
        elif not setting.check.holds(value):
            raise UserError(f"--{setting.name} must be {setting.check.phrase()}, got {value}")
    if args.dim % args.groups:
        raise UserError(f"--dim must be a multiple of --groups {args.groups} (the U-Net's GroupNorm groups), "
                        f"got {args.dim}")


def job_asked(given):
    """The job the flags `given` ask for: the one whose flag goes with no other (none: training), then of the jobs
    going with it the one whose flag is given. UserError for two jobs, or a job without its --model_path."""
    top = one_job([job for job in JOBS if job.under is None and job.flag in given], "") or JOB["train"]
    if top.model and "model_path" not in given:
        raise UserError(f"{top.words} needs --model_path (a checkpoint written by training with this tool)")
    return one_job([job for job in JOBS if job.under and job.under == top.flag and job.flag in given],
                   f" at {top.words}") or top


def one_job(asked, place):
    """The one job of `asked` (None: none); UserError when there are more."""
    if len(asked) > 1:
        raise UserError(f"{' and '.join(job.words for job in asked)} are separate jobs{place}: give one per command")
    return asked[0] if asked else None


def check_flags_apply(args, given, job):
    """Every flag given does something in the job, beside a flag it needs and none it excludes; no path flag empty."""
    for setting in FLAGS:
        if setting.name not in given:
            continue
        if job.name not in setting.jobs:
            raise UserError(misplaced_flag(setting, job))
        if setting.needs and not given & set(setting.needs):
            others = " or ".join(f"--{name}" for name in setting.needs)
            raise UserError(f"--{setting.name} goes with {others}; give {'it' if len(setting.needs) == 1 else 'one'} "
                            "too")
        for other in (name for name in setting.excludes or () if name in given):
            raise UserError(f"--{setting.name} and --{other} cannot go together: give one of them")
        if setting.is_path and getattr(args, setting.name) == "":
            raise UserError(f"--{setting.name} is empty: name a {'folder' if 'DIR' in setting.metavar else 'file'}")


def misplaced_flag(setting, job):
    """Why a flag does nothing in `job`: its job goes with another flag, the job runs its own sampler, or it is for
    other jobs."""
    asked = setting.asks_for
    if asked and asked.under:
        return f"--{setting.name} goes with --{asked.under} (its job works on a trained model: --model_path CKPT)"
    if job.sampler and setting.stored == SAMPLING:
        return (f"--{setting.name} does nothing in {job.words}, which always runs its own sampler (--sampling_steps "
                "sets its steps); drop it")
    whole = set(INFERENCE) <= set(setting.jobs)  # all of --inference's jobs: said as --inference
    uses = [JOB[name].words for name in setting.jobs if not (whole and JOB[name].under)]
    return (f"--{setting.name} does nothing in {job.words}"
            + (f" (it is for {' and '.join(uses)})" if len(uses) <= 3 else "") + "; drop it")


def check_paths(args, job):
    """The run name is a name, the files the job's flags read exist and its folders can be written."""
    if args.run_name is not None:
        check_run_name(args.run_name)
    for setting in (setting for setting in FLAGS if job.name in setting.jobs):
        value = getattr(args, setting.name)
        for path in paths_named(setting, value):
            problem = input_file_problem(path)
            if problem:  # a flag that takes more than paths says what it takes
                raise UserError(f"--{setting.name} {path!r} {problem}"
                                + ("" if setting.parse is str else f"; --{setting.name}: {setting.help}"))
        if setting.io == WRITES and value is not None:
            check_writable_folder(value, f"--{setting.name}")


def paths_named(setting, value):
    """The files a flag that reads them (Setting.io READS) names: a path, or the files among its Items (test indices,
    seeds and shapes name none)."""
    if setting.io != READS or value is None:
        return []
    return [item.value if isinstance(item, Item) else item for item in (value if isinstance(value, list) else [value])
            if not isinstance(item, Item) or item.kind == "file"]


def files_read(args, job):
    """[(flag, path)] of every file the job's flags read: what no output may be written over (make_way)."""
    return [(f"--{setting.name}", path) for setting in FLAGS if job.name in setting.jobs
            for path in paths_named(setting, getattr(args, setting.name))]


def resolve_synonyms(args, given):
    """--no_compile is --compile off, --no_bf16 --precision fp32, as if given; beside a contradicting flag, an error."""
    for old, (flag, value) in SYNONYMS.items():
        if getattr(args, old):
            if flag in given and getattr(args, flag) != value:
                raise UserError(f"--{old} means --{flag} {value}, but --{flag} {getattr(args, flag)} was given too; "
                                "give one of them")
            setattr(args, flag, value)
            given = given | {flag}
    return given


def flags_markdown():
    """docs/flags.md: every flag by section with its default, what it may be and what a resume does with it; presets."""
    lines = ["# Flags", "", "Generated from `ddpm_config.SETTINGS` by `python ddpm_flags.py > docs/flags.md` "
             "(tests/test_config.py keeps it in sync). *On --resume*: **kept** settings are what the run trains and "
             "cannot change; the others may be given anew.", ""]
    for key, (title, text) in SECTIONS.items():
        lines += [f"## {title[0].upper()}{title[1:]}", ""] + ([text, ""] if text else [])
        lines += ["| flag | default | may be | on --resume | meaning |", "|---|---|---|---|---|"]
        for s in (s for s in FLAGS if s.section == key):
            default = "" if s.default is None or s.default is False else f"`{flag_text(s.default)}`"
            may = (", ".join(s.choices) if s.choices else s.check.phrase() if s.check else
                   "a switch" if s.parse is bool else "")
            meaning = f"{s.help}.{' ' + s.more if s.more else ''}" + (" (a synonym, hidden in --help)" if s.hidden
                                                                       else "")
            meaning += f" With {' or '.join(f'--{name}' for name in s.needs)}." if s.needs else ""
            lines.append(f"| `--{s.name}` | {default} | {may} | {RESUME_WORDS.get(s.stored, '')} | "
                         f"{meaning.replace('|', '/')} |")
        lines.append("")
    lines += ["## Presets", "", "`--preset NAME` sets these flags for a new training run; flags given beside it win.",
              ""]
    for name, (what, _) in PRESETS.items():
        lines += [f"- **{name}**: {what}. `{preset_flags(name)}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
