"""The feature store: Q-Former outputs of every image, computed once, read through memory maps.

Layout of a store directory:
  meta.json                 format version, encoder fingerprint, row shape [views, queries, width], dtype, count
  shards/<writer>-<seq>.f16 fixed-size fp16 rows, raw, append-only (a new file per commit, never rewritten);
                            <writer> is run<N>-r<rank>, N counting the extraction jobs into the store
  shards/<writer>-<seq>.json the commit record of that shard: its image keys, a checksum per row, the sources
                            (image paths as resolved from manifests) that map to keys, and each source's stamp
                            (size, mtime in ns) when it was read
  rejects.jsonl             inputs that were skipped, with the reason
A shard counts only once its .json exists; both files are written to a temporary name and renamed, the .json last,
so a process killed at any moment leaves a valid store (at worst an orphan .f16 or .tmp, removed on the next write).
The image key is a hash of the image file's bytes, so duplicate images are encoded once. A path answers with its
recorded key only while its stamp is unchanged; a changed (or unstamped) file is looked up by its bytes, and
extraction encodes it again: a later job's record of a source replaces an earlier one's.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from align.constants import REJECTS, STORE_META, STORE_SHARDS
from align.errors import AlignError
from align.files import read_json_object, write_atomic
from align.tools.images import BadImage, Stamp, file_stamp, image_bytes

FORMAT, FORMAT_VERSION = "align-feature-store", 1
NOT_IN_STORE = "not in the feature store"
DTYPE = np.float16


class StoreError(AlignError):
    """A feature store that is missing, damaged, or made by another encoder."""


def image_key(data: bytes) -> str:
    """The store key of an image: a hash of its file bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def row_checksum(row: np.ndarray) -> str:
    """Checksum of one stored row's bytes."""
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Location:
    """Where one key's row lives."""

    shard: str
    row: int


def read_shard_record(path: Path) -> dict:
    """A shard's commit record (keys, checksums, sources), checked: a damaged one is a one-line StoreError."""
    record = read_json_object(path, StoreError)
    keys, checksums, sources = record.get("keys"), record.get("checksums"), record.get("sources")
    if (not isinstance(keys, list) or not isinstance(checksums, list) or len(keys) != len(checksums)
            or not isinstance(sources, dict) or not all(isinstance(k, str) for k in keys)):
        raise StoreError(f"{path} is a damaged shard record (it needs keys, checksums of the same length, sources)")
    return record


def _stamp(value) -> Stamp | None:
    """A recorded stamp, or None where a record has none (stores written before stamps) or a damaged one."""
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        return value[0], value[1]
    return None


class FeatureStore:
    """Read and append access to one store directory."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.row_shape: tuple[int, ...] = tuple(meta["row_shape"])
        self.index: dict[str, Location] = {}
        self.sources: dict[str, str] = {}
        self.stamps: dict[str, Stamp] = {}
        self.checksums: dict[str, str] = {}
        self.physical_rows = 0
        self._maps: dict[str, np.ndarray] = {}
        self._load_commits()

    # -- opening ----------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, fingerprint: str | None = None, row_shape: tuple[int, ...] | None = None) -> "FeatureStore":
        """Open an existing store; a different encoder fingerprint or row shape is refused, naming both."""
        store = cls(Path(path), cls.read_meta(path))
        store.require(fingerprint, row_shape)
        return store

    @staticmethod
    def read_meta(path: Path | str) -> dict:
        """A store's meta.json, checked, without reading its index (cheap at any size)."""
        path = Path(path)
        if not (path / STORE_META).is_file():
            raise StoreError(f"{path} is not a feature store (no {STORE_META}); create it with `align features extract`")
        meta = read_json_object(path / STORE_META, StoreError)
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path} is not an {FORMAT} v{FORMAT_VERSION} store")
        shape = meta.get("row_shape")
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise StoreError(f"{path / STORE_META}: row_shape must be three positive integers, not {shape!r}")
        if not isinstance(meta.get("encoder_fingerprint"), str):
            raise StoreError(f"{path / STORE_META}: no encoder_fingerprint")
        return meta

    @classmethod
    def create(cls, path: Path | str, fingerprint: str, row_shape: tuple[int, ...], info: dict) -> "FeatureStore":
        """Create an empty store, or open the existing one if it was made the same way."""
        path = Path(path)
        if (path / STORE_META).is_file():
            return cls.open(path, fingerprint, row_shape)
        (path / STORE_SHARDS).mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "encoder_fingerprint": fingerprint,
            "row_shape": list(row_shape),
            "dtype": "float16",
            "count": 0,
            **info,
        }
        write_atomic(path / STORE_META, json.dumps(meta, indent=2).encode())
        return cls(path, meta)

    def require(self, fingerprint: str | None, row_shape: tuple[int, ...] | None) -> None:
        """Refuse use with an encoder (fingerprint) or row shape other than the store's."""
        if fingerprint is not None and fingerprint != self.meta["encoder_fingerprint"]:
            raise StoreError(
                f"store {self.path} was made by encoder {self.meta['encoder_fingerprint']}, not {fingerprint}; "
                "extract into a new store for this encoder"
            )
        if row_shape is not None and tuple(row_shape) != self.row_shape:
            raise StoreError(f"store {self.path} holds rows of shape {list(self.row_shape)}, not {list(row_shape)}")

    def _load_commits(self) -> None:
        # Sorted shard names (jobs in order) make the first writer of a duplicated key win and the latest job's record
        # of a source, in every process.
        for record_path in sorted((self.path / STORE_SHARDS).glob("*.json")):
            self._apply(record_path.stem, read_shard_record(record_path))

    def _apply(self, shard: str, record: dict) -> None:
        """Add one shard's commit record to the in-memory index (the first row of a key wins)."""
        for row, (key, checksum) in enumerate(zip(record["keys"], record["checksums"])):
            self.index.setdefault(key, Location(shard, row))
            self.checksums.setdefault(key, checksum)
        self.physical_rows += len(record["keys"])
        stamps = record.get("stamps") if isinstance(record.get("stamps"), dict) else {}
        for source, key in record["sources"].items():
            self.sources[source] = key
            stamp = _stamp(stamps.get(source))
            if stamp:
                self.stamps[source] = stamp
            else:
                self.stamps.pop(source, None)

    # -- reading ----------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def _rows_of(self, shard: str) -> np.ndarray:
        if shard not in self._maps:
            file = self.path / STORE_SHARDS / f"{shard}.f16"
            rows = file.stat().st_size // (DTYPE().itemsize * int(np.prod(self.row_shape)))
            self._maps[shard] = np.memmap(file, dtype=DTYPE, mode="r", shape=(rows, *self.row_shape))
        return self._maps[shard]

    def get(self, key: str) -> np.ndarray:
        """The row of an image key: [views, queries, width] fp16 (a read-only memory map)."""
        try:
            location = self.index[key]
        except KeyError:
            raise StoreError(f"image {key} is not in the store {self.path}") from None
        return self._rows_of(location.shard)[location.row]

    def current_key(self, source: str) -> str | None:
        """The key extracted for this path while the file is unchanged since (same size and mtime), else None."""
        stamp = self.stamps.get(source)
        if stamp is None or file_stamp(source) != stamp:
            return None
        key = self.sources.get(source)
        return key if key in self else None

    def find(self, path: Path) -> str | None:
        """The key of an image file in this store: as extracted under this path while unchanged, else by its bytes
        (changed since, or extracted under another path); None if absent."""
        key = self.current_key(str(path))
        if key is None:
            try:
                key = image_key(image_bytes(path))
            except BadImage:
                return None
        return key if key in self else None

    def locate(self, path: Path) -> str:
        """`find`, or a StoreError saying whether the file is not in the store or changed since it was extracted."""
        key = self.find(path)
        if key is None:
            if str(path) in self.sources:
                raise StoreError(f"changed since it was extracted: image {path} (run features extract again)")
            raise StoreError(f"{NOT_IN_STORE}: image {path}")
        return key

    # -- writing ----------------------------------------------------------------------------------------------------

    def next_writer_prefix(self) -> str:
        """`run<N>` for a new extraction job: after every job before it in shard-name order."""
        runs = [int(m.group(1)) for f in (self.path / STORE_SHARDS).glob("run*-*.json")
                if (m := re.match(r"run(\d+)-", f.name))]
        return f"run{max(runs, default=0) + 1:06d}"

    def clean_partial_writes(self) -> None:
        """Remove what killed writers left behind: temporary files and shards with no commit record (call it only
        while holding the store's lock, before this job writes)."""
        for file in (self.path / STORE_SHARDS).glob("*"):
            committed = file.with_suffix(".json").is_file()
            if file.suffix == ".tmp" or (file.suffix == ".f16" and not committed):
                file.unlink()

    def commit(self, writer: str, keys: list[str], rows: np.ndarray, sources: dict[str, str],
               stamps: dict[str, Stamp]) -> None:
        """Append rows (and source → key aliases with the sources' stamps) as one new shard, atomically."""
        existing = sorted((self.path / STORE_SHARDS).glob(f"{writer}-*.json"))
        seq = int(existing[-1].stem.rsplit("-", 1)[1]) + 1 if existing else 0
        shard = f"{writer}-{seq:06d}"
        rows = np.ascontiguousarray(rows, dtype=DTYPE)
        if keys:
            write_atomic(self.path / STORE_SHARDS / f"{shard}.f16", rows.tobytes())
        record = {"keys": keys, "checksums": [row_checksum(r) for r in rows], "sources": sources,
                  "stamps": {source: list(stamp) for source, stamp in stamps.items()}}
        write_atomic(self.path / STORE_SHARDS / f"{shard}.json", json.dumps(record).encode())
        self._apply(shard, record)

    def write_count(self) -> None:
        """Record the current number of images in meta.json (when it changed: a store with nothing new may be on a
        read-only file system)."""
        if self.meta.get("count") == len(self):
            return
        self.meta["count"] = len(self)
        write_atomic(self.path / STORE_META, json.dumps(self.meta, indent=2).encode())

    # -- inspection -------------------------------------------------------------------------------------------------

    def info(self) -> dict:
        """Counts, shape, fingerprint and size on disk."""
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        rejects = self.path / REJECTS
        return {
            "path": str(self.path),
            "images": len(self),
            "rows_on_disk": self.physical_rows,
            "sources": len(self.sources),
            "row_shape": list(self.row_shape),
            "dtype": self.meta["dtype"],
            "views": self.row_shape[0],
            "encoder_fingerprint": self.meta["encoder_fingerprint"],
            "shards": len(list((self.path / STORE_SHARDS).glob("*.json"))),
            "rejects": sum(1 for _ in rejects.open()) if rejects.is_file() else 0,
            "bytes_on_disk": size,
        }

    def verify(self) -> list[str]:
        """Every problem found: unreadable shards, rows failing their checksum, sources naming unknown keys or changed
        since they were extracted."""
        problems = []
        for record_path in sorted((self.path / STORE_SHARDS).glob("*.json")):
            record = read_shard_record(record_path)
            if not record["keys"]:
                continue
            try:
                rows = self._rows_of(record_path.stem)
            except (OSError, ValueError) as exc:
                problems.append(f"{record_path.stem}: unreadable shard ({exc})")
                continue
            if len(rows) != len(record["keys"]):
                problems.append(f"{record_path.stem}: {len(rows)} rows on disk, {len(record['keys'])} recorded")
                continue
            for row, (key, checksum) in enumerate(zip(record["keys"], record["checksums"])):
                if row_checksum(rows[row]) != checksum:
                    problems.append(f"{record_path.stem} row {row} (image {key}): checksum mismatch")
        problems += [f"source {s} names missing image {k}" for s, k in self.sources.items() if k not in self.index]
        changed = [s for s, stamp in self.stamps.items() if file_stamp(s) not in (stamp, None)]
        problems += [f"source {s} changed since it was extracted (run features extract again)" for s in changed]
        if len(self) < int(self.meta.get("count", 0)):
            problems.append(f"meta.json counts {self.meta['count']} images but the index reaches {len(self)}: "
                            "shard records are missing")
        indexed = {p.stem for p in (self.path / STORE_SHARDS).glob("*.json")}
        problems += [f"{f.stem}: rows on disk without an index record" for f in (self.path / STORE_SHARDS).glob("*.f16")
                     if f.stem not in indexed]
        return problems


class ShardRows:
    """Rows by number (shard index × 2**32 + row within the shard) over a fixed list of shards: what a training
    rank reads through, without loading the store's key index (which grows with the number of images)."""

    def __init__(self, path: Path | str, shards: list[str], row_shape: tuple[int, ...]):
        self.path, self.shards, self.row_shape = Path(path), list(shards), tuple(row_shape)
        self._maps: dict[int, np.ndarray] = {}

    def _shard(self, index: int) -> np.ndarray:
        if index not in self._maps:
            file = self.path / STORE_SHARDS / f"{self.shards[index]}.f16"
            if not file.is_file():
                raise StoreError(f"store {self.path} lost shard {self.shards[index]}; rebuild the render cache")
            rows = file.stat().st_size // (DTYPE().itemsize * int(np.prod(self.row_shape)))
            self._maps[index] = np.memmap(file, dtype=DTYPE, mode="r", shape=(rows, *self.row_shape))
        return self._maps[index]

    def get(self, number: int) -> np.ndarray:
        """One row: [views, queries, width] fp16."""
        return self._shard(number >> 32)[number & 0xFFFFFFFF]
