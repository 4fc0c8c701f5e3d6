"""Writing files so that a kill at any instruction leaves the old file or the new one, never half; reading JSON
objects with one-line errors."""

import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from align.errors import AlignError


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        tmp.write(raw)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def open_own(path: Path, mode: str = "a"):
    """Open a file a job creates or keeps writing to (`a` appends, `a+` reads too), never through a symbolic link:
    a link planted in a shared output folder would otherwise turn the job into a writer of whatever it points at."""
    path = Path(path)
    flags = os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise AlignError(f"{path} is a symbolic link; align writes no file through a link it did not make: "
                             "remove it") from None
        raise AlignError(f"cannot open {path} for writing: {exc.strerror or exc}") from None
    return os.fdopen(fd, mode, encoding="utf-8")


def read_json_object(path: Path, error: type[AlignError] = AlignError) -> dict:
    """The JSON object in `path`, or `error` with one line naming the file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object")
    return data


# The names of the folders a replacement makes beside its target: distinctive, so that align removes only what it
# made itself, never a user's `.adapter.old` or `.adapter.backup`.
STAGING_INFIX, REPLACED_SUFFIX = ".align-staging-", ".align-replaced"


def _old(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}{REPLACED_SUFFIX}")


def staging_dir(directory: Path) -> Path:
    """A new, empty folder beside `directory` to write its next version in (then `replace_dir`); the folders that
    killed writers left there are removed first."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".{directory.name}{STAGING_INFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}{STAGING_INFIX}"))


def recover_dir(directory: Path) -> None:
    """Finish or undo a `replace_dir` that a kill interrupted: the previous version comes back if the new one never
    arrived; leftovers of either are removed."""
    directory, old = Path(directory), _old(Path(directory))
    if old.exists():
        if directory.exists():
            shutil.rmtree(old)  # the new version is in place: the kill came before the old one was removed
        else:
            os.replace(old, directory)  # the kill came between the two renames: keep the previous version


def replace_dir(staging: Path, directory: Path) -> None:
    """Put a fully written `staging` folder in place of `directory` so that a kill at any instruction leaves the old
    version or the new one under the name (`recover_dir` tidies up on the next call)."""
    directory = Path(directory)
    recover_dir(directory)
    if directory.exists():
        os.replace(directory, _old(directory))
        os.replace(staging, directory)
        shutil.rmtree(_old(directory))
    else:
        os.replace(staging, directory)


_HELD: "weakref.WeakSet[FolderLock]" = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    """In a forked child (a decode worker, say) drop the copies of the job's lock files: a flock belongs to the open
    file, so a child that outlived a killed parent would otherwise hold the folder forever."""
    for lock in list(_HELD):
        if lock._file is not None:
            lock._file.close()  # this process's copy only: no LOCK_UN, the parent keeps its lock while it lives
            lock._file = None


os.register_at_fork(after_in_child=_forget_locks_in_child)


class FolderLock:
    """An exclusive lock on a folder for the length of a job (`.align.lock` inside it, held with flock): a second
    job on the same folder is refused, naming the holder, instead of mixing its files with the first one's. Forked
    children never hold it."""

    NAME = ".align.lock"

    def __init__(self, folder: Path, what: str):
        self.path, self.what, self._file = Path(folder) / self.NAME, what, None

    def __enter__(self) -> "FolderLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open_own(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise AlignError(f"{self.path.parent} is in use by another align job ({holder}); wait for it to end or "
                             f"use another {self.what}") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}")
        self._file.flush()
        _HELD.add(self)
        return self

    def __exit__(self, *exc) -> None:
        _HELD.discard(self)
        if self._file is not None:
            self._file.close()  # closing releases the lock
