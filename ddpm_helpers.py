"""Small shared pieces: the error types and exit statuses, crash-safe writes that refuse NaN, and the run name and
every path a run writes."""
import contextlib
import errno
import fcntl
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


class StopRequested(BaseException):
    """SIGINT / SIGTERM (its name the message) outside the training steps, raised at once; exit status 130. Not an
    Exception, as KeyboardInterrupt is not: no `except Exception` (the tool's, torch's) takes it for a failure."""


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


@contextlib.contextmanager
def new_folder(path):
    """A folder that appears at `path` (absent or empty) only once the block has written its files into the temporary
    folder it is given: a failed write or a stop leaves nothing behind (WriteError for a failed one)."""
    tmp = f"{os.path.normpath(path)}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp)
        yield tmp
        if os.path.isdir(path):
            os.rmdir(path)  # empty: anything else was refused before
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"could not write {path} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_folder(files, path):
    """A new folder of files ({name: bytes}) at `path` (new_folder)."""
    with new_folder(path) as tmp:
        for name, data in files.items():
            with atomic_open(os.path.join(tmp, name)) as f:
                f.write(data)


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
    "nearest": "nearest_training_{run}.png",
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

    @property
    def lock(self):
        """<models_dir>/<run>.lock: which process holds the run (run_lock)."""
        return os.path.join(self.models_dir, f"{self.run_name}.lock")

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
        """'<name>.tmp<pid>' files and folders of this run (its folder's too) whose process no longer runs (kill -9, a
        power cut)."""
        found = []
        for folder, names in ((self.models_dir, re.compile(re.escape(self.run_name) + r"\.tmp([0-9]+)")),
                              (self.ckpt_dir, re.compile(f"(?:{'|'.join(map(re.escape, CHECKPOINT_NAMES))})"
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


@contextlib.contextmanager
def run_lock(files, held=True):
    """The block holds the run's folder (training, resume, import; `held` False: a rank other than 0): an advisory
    lock on RunFiles.lock, which names this process. UserError naming the process that holds it; the lock file of a
    process that no longer runs is taken over with a note. The file goes when the block ends."""
    if not held:
        yield
        return
    with made_folders(files.models_dir), lock_file(files):
        yield


@contextlib.contextmanager
def made_folders(path):
    """`path` and the parents it lacks, created for the block; those still empty after it removed again (a run
    refused before it wrote anything leaves nothing behind)."""
    missing = []
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(path, exist_ok=True)
    try:
        yield
    finally:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)


@contextlib.contextmanager
def lock_file(files):
    """run_lock in an existing models_dir."""
    while True:  # until the file locked is the one at the path (a holder removes it as it finishes)
        fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"run {files.run_name!r} is in use by pid {holder} (its lock: {files.lock}): wait for it "
                            "to finish, or give another --run_name") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(files.lock).st_ino:
                break
        os.close(fd)
    left = os.read(fd, 32).decode(errors="replace").strip()
    if left.isdigit() and not process_running(int(left)):
        print(f"note: {files.lock} was left by pid {left}, which no longer runs; this process takes the run over",
              file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        os.remove(files.lock)
        os.close(fd)


def make_way(files, inputs):
    """Before a command writes `files`: UserError when an input [(flag, path)] is one of its outputs; then the
    temporary files of killed runs of the same name go."""
    for flag, path in inputs:
        if files.is_output(path):
            raise UserError(f"{flag} {path!r} is where this command writes one of its outputs (run "
                            f"{files.run_name!r}); give another --run_name or --save_dir, or move the file")
    for path in files.stale_temporaries():
        (shutil.rmtree if os.path.isdir(path) else os.remove)(path)


def stderr_is_terminal():
    return sys.stderr.isatty()
