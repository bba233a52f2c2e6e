"""Files the tool fetches on first use (the Inception weights FID and IS run on, Ho et al.'s published weights):
downloaded once into torch's hub cache, where torch.hub and torch-fidelity look for them too, checked by their
published hash (SHA-256, or MD5 where that is all the publisher gives) before they are kept, with a progress bar. A
fetch that fails or brings the wrong bytes keeps nothing and is one line saying where the file comes from and which
flag takes a copy fetched by hand."""
import hashlib
import os
import sys
import urllib.request
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ddpm_helpers import UserError, WriteError, atomic_open
from ddpm_runtime import format_bytes

CHUNK = 1 << 20         # bytes read and hashed at a time
TIMEOUT_S = 30          # a server silent this long counts as unreachable


@dataclass(frozen=True)
class RemoteFile:
    """A file the tool can fetch: where from, what it must hash to, and for the messages what it is and which flag
    takes a copy fetched by hand."""
    url: str
    digest: str          # the whole file's hash, hex
    size: int            # bytes (about), for the progress bar when the server does not say
    what: str            # e.g. "the Inception-v3 weights of FID and IS"
    flag: str            # e.g. "--fid_inception"
    algorithm: str = "sha256"  # what `digest` is: a hashlib name
    name: str = None     # the cached file's name (None: the URL's last part)

    @property
    def file_name(self):
        return self.name or self.url.rsplit("/", 1)[-1]


def cache_folder():
    """torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def file_digest(path, algorithm="sha256"):
    """The hex digest of a file's bytes (SHA-256, or another hashlib `algorithm`)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetched(remote, progress=False, verbose=True):
    """The path of `remote` in the cache folder, downloaded there first when it is missing or its bytes are not the
    right ones (a damaged copy is fetched again, with a note). UserError, with nothing kept, when the download fails
    or brings other bytes."""
    path = os.path.join(cache_folder(), remote.file_name)
    if os.path.isfile(path):
        if file_digest(path, remote.algorithm) == remote.digest:
            return path
        print(f"note: {path} is not the file {remote.url} serves (its {hash_label(remote)} differs): fetching it again",
              file=sys.stderr)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the cache folder {os.path.dirname(path)} ({e.strerror}) for {remote.what}: set "
                        f"TORCH_HOME to a writable folder, or fetch {remote.url} by hand and pass it with "
                        f"{remote.flag} PATH") from None
    try:
        with atomic_open(path) as f:
            _download(remote, f, path, progress, verbose)
    except WriteError as e:
        raise UserError(f"{e}: set TORCH_HOME to a folder with room, or fetch {remote.url} by hand and pass it with "
                        f"{remote.flag} PATH") from None
    return path


def _download(remote, f, path, progress, verbose):
    """remote's bytes into the open file f (which becomes path), hashed as they come, saying so once the server
    answers; UserError (not OSError, which atomic_open reads as a failed write) when the server cannot be reached or
    the bytes are not the right ones."""
    digest = hashlib.new(remote.algorithm)
    by_hand = f"download it by hand and pass it with {remote.flag} PATH"

    def unreachable(e):  # no network, DNS, refused, timeout, HTTP errors (urllib's are OSErrors)
        reason = getattr(e, "reason", None) or e.strerror or e
        return UserError(f"could not fetch {remote.what} from {remote.url} ({type(e).__name__}: {reason}): {by_hand}")

    try:
        response = urllib.request.urlopen(remote.url, timeout=TIMEOUT_S)
    except OSError as e:
        raise unreachable(e) from None
    if verbose:
        print(f"fetching {remote.what} ({format_bytes(remote.size)}, once) from {remote.url} into {path}",
              file=sys.stderr, flush=True)
    with response, tqdm(total=int(response.headers.get("Content-Length") or remote.size), unit="B", unit_scale=True,
                        unit_divisor=1024, desc=remote.file_name, leave=False, disable=not progress) as bar:
        while True:
            try:
                chunk = response.read(CHUNK)
            except OSError as e:
                raise unreachable(e) from None
            if not chunk:
                break
            digest.update(chunk)
            f.write(chunk)  # a failed write is atomic_open's WriteError
            bar.update(len(chunk))
    if digest.hexdigest() != remote.digest:
        raise UserError(f"the file fetched from {remote.url} is not the expected one ({hash_label(remote)} "
                        f"{digest.hexdigest()[:12]}…, expected {remote.digest[:12]}…): nothing was kept; {by_hand}")


def hash_label(remote):
    """How messages name remote's hash: 'SHA-256', 'MD5'."""
    return {"sha256": "SHA-256", "md5": "MD5"}.get(remote.algorithm, remote.algorithm)
