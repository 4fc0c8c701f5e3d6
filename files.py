"""Writing files so that a kill at any instruction leaves the old file or the new one, never half; a full disk or a
read-only folder as one line naming the folder (and the space), with nothing half-written left; reading JSON objects
with one-line errors."""

import errno
import json
import os
import re
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

from align.errors import AlignError

# The failures of a write that the user fixes on the machine (space, quota, permissions), not in align.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_OS_ERROR = re.compile(r"os error (\d+)")  # how Rust writers (safetensors, tokenizers) report one


class WriteError(AlignError):
    """A file that cannot be written: no space, over quota, or a read-only or foreign folder."""


def write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write the user must fix, or None for any other exception."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in WRITE_ERRNOS else None
    found = _OS_ERROR.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return int(found.group(1)) if found and int(found.group(1)) in WRITE_ERRNOS else None


def write_error(exc: BaseException, where: Path | str, needed: int | None = None) -> WriteError:
    """One line for a failed write under the folder `where`: the file, why, and for a full disk the space there and
    what was needed."""
    code = write_errno(exc)
    where = Path(where)
    file = Path(getattr(exc, "filename", None) or where)
    folder = where if where.is_dir() else where.parent
    why = (os.strerror(code) if code else str(exc)).lower()
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            room = f"{_size(shutil.disk_usage(_existing(folder)).free)} free there"
        except OSError:
            room = "no space there"
        want = f", {_size(needed)} needed" if needed else ""
        return WriteError(f"cannot write {file}: {why} ({room}{want}); free space for {folder} or write elsewhere")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return WriteError(f"cannot write {file}: {why}; {_existing(folder)} must be writable for this command")
    return WriteError(f"cannot write {file}: {why}")


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _size(n: int | None) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n is None or n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextmanager
def writing(path: Path | str, needed: int | None = None):
    """Turn a failed write inside the block (no space, quota, read-only, permissions) into one WriteError line."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        if write_errno(exc) is None:
            raise
        raise write_error(exc, path, needed) from None


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`; on failure the
    temporary file is removed and the old file stays."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = None
    try:
        with writing(path, len(raw)):
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                             delete=False) as tmp:
                tmp.write(raw)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp.name, path)
    except BaseException:
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)
        raise


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
        raise write_error(exc, path) if write_errno(exc) else \
            AlignError(f"cannot open {path} for writing: {exc.strerror or exc}") from None
    return _OwnFile(os.fdopen(fd, mode, encoding="utf-8"), path)


class _OwnFile:
    """A file `open_own` opened: a write that fails (a full disk, say) is one WriteError line naming it."""

    def __init__(self, file, path: Path):
        self._file, self.path = file, path

    def write(self, text: str) -> int:
        with writing(self.path):
            return self._file.write(text)

    def flush(self) -> None:
        with writing(self.path):
            self._file.flush()

    def close(self) -> None:
        with writing(self.path):
            self._file.close()

    def __iter__(self):
        return iter(self._file)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self) -> "_OwnFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_json_object(path: Path, error: type[AlignError] = AlignError, max_bytes: int | None = None) -> dict:
    """The JSON object in `path`, or `error` with one line naming the file and what is wrong (unreadable, larger
    than `max_bytes`, not JSON, nested past Python's limit, a number too long to read, not an object)."""
    try:
        if max_bytes is not None and Path(path).stat().st_size > max_bytes:
            raise error(f"{path} is {Path(path).stat().st_size:,} bytes; a file of its kind is far smaller "
                        f"(at most {max_bytes:,})")
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from None
    except RecursionError:
        raise error(f"cannot read {path}: it is nested too deeply to read") from None
    except ValueError as exc:  # an integer of more digits than Python reads
        raise error(f"cannot read {path}: {str(exc).split(';')[0]}") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object")
    return data


def record_job(recorded: Path, job: dict, continuing: bool, holder: str) -> None:
    """Record what decides a job's output in `recorded`; a job continuing an output another job made is refused,
    naming the settings that differ (`holder` says whose output: "--out P holds predictions")."""
    if continuing and Path(recorded).is_file():
        before = read_json_object(recorded)
        changed = sorted(k for k in job.keys() | before.keys() if job.get(k) != before.get(k))
        if changed:
            raise AlignError(f"{holder} of another job ({', '.join(changed)} differ); give a new --out, or delete "
                             "it to start over")
    write_atomic(recorded, json.dumps(job, indent=1, sort_keys=True))


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


@contextmanager
def staged(directory: Path):
    """A staging folder for the next version of `directory`, put in place when the block ends; when it fails (a full
    disk, say) the staging folder is removed and `directory` is untouched."""
    with writing(directory):
        staging = staging_dir(directory)
    try:
        with writing(directory):
            yield staging
            replace_dir(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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

        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = open_own(self.path, "a+")
        except WriteError:
            if os.access(self.path.parent, os.W_OK) and not _read_only_fs(self.path.parent):
                raise
            # A folder this process cannot write (a read-only mount): a job that finds nothing to do there still
            # runs; any write it tries is refused in one line. The lock file, if there is one, is held shared.
            if not self.path.is_file():
                return self
            self._file = open(self.path, encoding="utf-8")
            return self._hold(fcntl.LOCK_SH)
        return self._hold(fcntl.LOCK_EX)

    def _hold(self, kind: int) -> "FolderLock":
        import fcntl

        try:
            fcntl.flock(self._file, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise AlignError(f"{self.path.parent} is in use by another align job ({holder}); wait for it to end or "
                             f"use another {self.what}") from None
        if kind == fcntl.LOCK_EX:
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
