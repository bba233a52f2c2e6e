"""Small shared pieces: the error types and exit statuses, crash-safe writes that refuse NaN, and the run name and
every path a run writes."""
import contextlib
import errno
import json
import os
import re
import shutil
import stat
import string
import sys
import tempfile
from dataclasses import dataclass

import torch


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class NonFiniteError(Exception):
    """Numbers about to be written (weights, losses, images) are NaN or infinite: nothing was written."""


class WriteError(Exception):
    """A file could not be written (no space, permission, quota): the file it replaces is untouched, no temporary
    is left. One line, exit status 1."""


class OutOfMemory(Exception):
    """Memory ran out: reported as one line saying what ran out and which flag lowers the need, exit status 1."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss diverged): reported as one line, exit status 1."""


class Interrupted(Exception):
    """SIGINT / SIGTERM during training: state saved, reported with how to resume; exit status 130."""


class StopRequested(Exception):
    """SIGINT / SIGTERM (its name the message) outside the training steps, raised at once; exit status 130."""


# what stops a command with a message (failure_text) and an exit status (exit_status) instead of a traceback
STOPPING_ERRORS = (UserError, TrainingError, NonFiniteError, WriteError, OutOfMemory, Interrupted, StopRequested,
                   KeyboardInterrupt, OSError)


def failure_text(e):
    """How a command reports one of the STOPPING_ERRORS it stops on: one line (the resume command on a second)."""
    if isinstance(e, Interrupted):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C); files already written stay, nothing is half-written"
    if isinstance(e, StopRequested):
        return f"stopped by {e}; files already written stay, nothing is half-written"
    if isinstance(e, NonFiniteError):
        return f"error: {e}; nothing was written from them"
    if isinstance(e, OSError):
        return f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    return f"error: {e}"


def exit_status(e):
    """2 for bad input, 130 for an interruption, else 1."""
    return 2 if isinstance(e, UserError) else 130 if isinstance(e, (Interrupted, StopRequested, KeyboardInterrupt)) \
        else 1


def require_finite(tensor, what):
    """Raise NonFiniteError unless every value of `tensor` is finite; `what` names it in the message."""
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"{what} hold NaN or infinite values")


# ------------------------------------------------------------------------------------ files

@contextlib.contextmanager
def atomic_open(path):
    """A binary file that appears at `path` only once the block has written all of it to the disk (temporary file,
    fsync, rename): a crash never leaves a half-written file. A failed write is a WriteError naming the file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"could not write {path} ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


class _WriteErrorRecorder:
    """A file whose failing write keeps its OSError: torch.save turns it into a RuntimeError that no longer says why
    ('unexpected pos 64 vs 0')."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def atomic_torch_save(obj, path):
    with atomic_open(path) as f:
        recorder = _WriteErrorRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise recorder.error from None


def atomic_write_text(text, path):
    with atomic_open(path) as f:
        f.write(text.encode())


def write_folder(files, path):
    """A folder of files ({name: bytes}) that appears at `path` (absent or empty) only once all are written; a failed
    write is a WriteError that leaves nothing behind."""
    tmp = f"{os.path.normpath(path)}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp)
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if os.path.isdir(path):
            os.rmdir(path)  # empty: anything else was refused before
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"could not write {path} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(obj, path):
    """Indented JSON, written atomically; NaN or infinity (which JSON cannot hold) raise NonFiniteError."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        raise NonFiniteError(f"values for {path} are NaN or infinite") from None
    atomic_write_text(text + "\n", path)


def input_file_problem(path):
    """What keeps `path` from being read as a file (None: nothing), said after the path: missing, a link loop or a
    link to nothing, a folder or not a regular file (a FIFO would block), or unreadable. Nothing is read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
        return "does not exist" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device)"
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return f"cannot be read ({e.strerror})"


def check_writable_folder(path, flag):
    """UserError unless `path` is a folder this process can write in, or one it can create; creates nothing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path!r} cannot be a folder: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path!r} is not writable: {e.strerror} in {existing}") from None


# ------------------------------------------------------------------------------ run names and paths

NAME_MAX = 255  # the longest file name most file systems take (ext4, XFS, APFS, NTFS), in bytes
RUN_NAME_CHARACTERS = "letters A-Z a-z, digits, '_', '-' and '.'"  # POSIX's portable file name characters
# What a run writes to --save_dir, by what it holds ({run}: the run name); RunFiles builds every path from these.
OUTPUT_NAMES = {
    "forward_strip": "forward_process_{run}.png", "loss_history": "loss_history_{run}.json",
    "loss_curves": "loss_curves_{run}.png", "epoch_grid": "samples_{run}_epoch{epoch:03d}.png",
    "metrics": "metrics_{run}.json", "fid_samples": "fid_samples_{run}.npz", "samples_grid": "samples_{run}.png",
    "samples_folder": "samples_{run}", "samples_npz": "samples_{run}.npz",
    "guidance_sweep": "guidance_sweep_{run}.png", "denoising_strip": "denoising_strip_{run}.png",
    "nll": "nll_{run}.json", "nll_plot": "nll_terms_{run}.png",
    "inpainting": "inpaint_{run}.png", "inpainting_npz": "inpaint_{run}.npz", "inversion": "invert_{run}.png",
    "inversion_npz": "invert_{run}.npz", "inversion_json": "invert_{run}.json",
    "interpolation": "interpolate_{run}.png", "interpolation_npz": "interpolate_{run}.npz",
}
CHECKPOINT_NAMES = ("last.pt", "best.pt", "ckpt.pt", "config.json")  # what a run writes to <models_dir>/<run>/
# the most a name gains: the longest output name (epochs up to 10⁹) and atomic_open's '.tmp<pid>' (pid < 2²²)
LONGEST_DECORATION = (max(len(name.format(run="", epoch=999_999_999)) for name in OUTPUT_NAMES.values())
                      + len(f".tmp{2 ** 22}"))
MAX_RUN_NAME = NAME_MAX - LONGEST_DECORATION


def run_name_problem(name):
    """What is wrong with `name` as a run name (None: nothing): it names files, never a path, so POSIX's portable
    characters only, not '.' or '..', short enough for every name made from it."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}, which names a folder, not a run"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return f"may hold only {RUN_NAME_CHARACTERS} (no path separators, spaces or other characters)"
    if len(name) > MAX_RUN_NAME:
        return (f"is {len(name)} characters long; at most {MAX_RUN_NAME} leave room for the longest file name made "
                f"from it ({NAME_MAX} characters)")
    return None


def check_run_name(name):
    """UserError unless `name` is a valid run name (run_name_problem)."""
    problem = run_name_problem(name)
    if problem:
        raise UserError(f"--run_name {name!r} {problem}: it names files, not a place")


def sanitized_run_name(name, fallback="DDPM"):
    """A valid run name made from any text: runs of other characters become '_', leading '.', '_', '-' go
    ('../../x y' → 'x_y'), cut to MAX_RUN_NAME; `fallback` when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name or "")).lstrip("._-")[:MAX_RUN_NAME]
    return name or fallback


@dataclass(frozen=True)
class RunFiles:
    """Every path a run writes, from the two folders and the run name (checked first): checkpoints and config.json in
    <models_dir>/<run>/, outputs as <save_dir>/OUTPUT_NAMES."""
    models_dir: str
    save_dir: str
    run_name: str

    def __post_init__(self):
        check_run_name(self.run_name)

    @property
    def ckpt_dir(self):
        return os.path.join(self.models_dir, self.run_name)

    def checkpoint(self, name):
        """<models_dir>/<run>/<name>, name one of CHECKPOINT_NAMES."""
        if name not in CHECKPOINT_NAMES:
            raise ValueError(f"unknown checkpoint file {name!r}")
        return os.path.join(self.ckpt_dir, name)

    def output(self, kind, **fields):
        """<save_dir>/<OUTPUT_NAMES[kind] for this run>, e.g. output('epoch_grid', epoch=3)."""
        return os.path.join(self.save_dir, OUTPUT_NAMES[kind].format(run=self.run_name, **fields))

    def output_names(self, suffix=""):
        """A pattern of every file name this run writes to save_dir (epochs any number), followed by `suffix`."""
        patterns = []
        for template in OUTPUT_NAMES.values():
            patterns.append("".join(re.escape(text) + ("" if field is None else re.escape(self.run_name)
                                                       if field == "run" else r"[0-9]+")
                                    for text, field, _, _ in string.Formatter().parse(template)))
        return re.compile(f"(?:{'|'.join(patterns)}){suffix}")

    def is_output(self, path):
        """Whether `path` is one of the files this run writes to save_dir."""
        folder, name = os.path.split(os.path.realpath(path))
        return folder == os.path.realpath(self.save_dir) and self.output_names().fullmatch(name) is not None

    def stale_temporaries(self):
        """'<name>.tmp<pid>' files and folders of this run whose process no longer runs (kill -9, a power cut)."""
        found = []
        for folder, names in ((self.ckpt_dir, re.compile(f"(?:{'|'.join(map(re.escape, CHECKPOINT_NAMES))})"
                                                         r"\.tmp([0-9]+)")),
                              (self.save_dir, self.output_names(r"\.tmp([0-9]+)"))):
            for name in (os.listdir(folder) if os.path.isdir(folder) else []):
                match = names.fullmatch(name)
                if match and not process_running(int(match.group(1))):
                    found.append(os.path.join(folder, name))
        return found


def process_running(pid):
    """Whether a process of this id runs on this machine (this one included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2 ** 22  # another user's process; an id past the kernel's range runs nowhere
    return True


def make_way(files, inputs):
    """Before a command writes `files`: UserError when an input {flag: path} is one of its outputs; then the temporary
    files of killed runs of the same name go."""
    for flag, path in inputs.items():
        if path and files.is_output(path):
            raise UserError(f"{flag} {path!r} is where this command writes one of its outputs (run "
                            f"{files.run_name!r}); give another --run_name or --save_dir, or move the file")
    for path in files.stale_temporaries():
        (shutil.rmtree if os.path.isdir(path) else os.remove)(path)


def stderr_is_terminal():
    return sys.stderr.isatty()
