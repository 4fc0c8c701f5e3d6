"""`align features extract`: run the frozen encoder once over the images of manifests into a feature store.

Resumable (finished images are never encoded again), safe to kill at any moment, parallel over torchrun ranks
(each rank a disjoint share, its own shards, one store in the end), and bad input is rejected with a reason.
"""

import os
import shutil
import time
from contextlib import ExitStack, closing, contextmanager
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from align.words import counted
from align.errors import AlignError
from align.backbones.vision import Encoder, default_compute_dtype, encode, load_encoder
from align.tools.feature_store import REJECTS, FeatureStore, StoreError, image_key
from align.backbones.vision.preprocessing import Preprocessing, views
from align.tools.images import DEFAULT_MAX_PIXELS, BadImage, decode_image, image_file
from align.tools.manifest import image_refs, read_manifest, resolve_image
from align.files import FolderLock
from align.tools.rejects import RejectLog, rejects_path
from align.tools.runtime import Ranks, die_with_parent, local_device, progress_columns, start_ranks


class ExtractError(AlignError):
    """Extraction that produced nothing usable."""


@dataclass
class ExtractSummary:
    """What one extraction run did (summed over ranks)."""

    store: str
    images_seen: int = 0
    extracted: int = 0
    already_in_store: int = 0
    duplicates: int = 0
    rejected: int = 0
    reject_reasons: dict = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = ""
    dtype: str = ""
    store_images: int = 0

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


class ImageFiles(torch.utils.data.Dataset):
    """Reads, hashes, checks and preprocesses one image per item in a worker process; failures become reasons."""

    def __init__(self, paths: list[str], pre: Preprocessing, n_views: int, max_pixels: int, convert_modes: bool):
        self.paths, self.pre, self.n_views = paths, pre, n_views
        self.max_pixels, self.convert_modes = max_pixels, convert_modes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        source = self.paths[index]
        try:
            data, stamp = image_file(Path(source))
        except BadImage as exc:
            return {"source": source, "reject": str(exc)}
        key = image_key(data)
        try:
            image = decode_image(data, self.max_pixels, self.convert_modes)
        except BadImage as exc:
            return {"source": source, "reject": str(exc), "key": key}
        # Seeded by the image itself: every run and every rank makes the same training views.
        return {"source": source, "key": key, "stamp": stamp,
                "pixels": views(image, self.pre, self.n_views, int(key[:15], 16))}


def collect_images(manifests: Iterable[Path], image_root: Path | None, rejects: RejectLog | None) -> list[str]:
    """Resolved paths of every image the manifests name, each once, in order of first appearance."""
    seen: dict[str, None] = {}
    for manifest in manifests:
        for item in read_manifest(manifest, rejects):
            try:
                refs = image_refs(item.record)
            except AlignError as exc:
                refs, reason = [], str(exc)
            else:
                reason = "record without an image"
            if not refs and rejects is not None:
                rejects.add(item.where, reason)
            for ref in refs:
                seen.setdefault(str(resolve_image(ref, item.manifest, image_root)), None)
    return list(seen)


def extract_features(
    manifests: list[Path],
    encoder_path: Path,
    out: Path,
    *,
    batch_size: int = 32,
    n_views: int = 0,
    image_root: Path | None = None,
    workers: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    strict_modes: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    shard_images: int = 256,
    progress: bool = True,
) -> ExtractSummary:
    """Encode every image the manifests name that the store does not hold yet; return the summary."""
    started = time.perf_counter()
    ranks = start_ranks()
    where = local_device(device)
    dtype = dtype or default_compute_dtype(where)
    encoder = load_encoder(encoder_path).to(where, dtype)
    row_shape = (1 + n_views, *encoder.row_shape)
    info = {"preprocessing": encoder.preprocessing.as_dict(), "encoder_source": encoder.source, "compute_dtype": dtype}
    convert_modes = not strict_modes
    # The choice changes which images a store holds: stores made either way are never mixed.
    fingerprint = encoder.fingerprint(dtype) + ("+strict-modes" if strict_modes else "")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExtractError(f"--out {out} is a file, not a store folder")
    # The process group ends with the job: no rank exits while its communication threads still run.
    with closing(ranks), claimed_store(out, ranks):
        if ranks.rank == 0:
            FeatureStore.create(out, fingerprint, row_shape, info)
        ranks.barrier()
        if not ranks.sees_rank0_files(Path(out)):
            raise ExtractError(f"{out} is not shared by every node: the ranks of one extraction write one store, "
                               "so its folder must be on a file system all nodes see")
        store = FeatureStore.open(out, fingerprint, row_shape)
        rejects = RejectLog(Path(out) / REJECTS)

        # Only rank 0 logs manifest problems: every rank reads the same manifests.
        paths = collect_images(manifests, image_root, rejects if ranks.rank == 0 else None)
        # Rank 0 decides once, for every rank: this job's writer names (after every earlier job's) and which images
        # are pending (not extracted, or changed since: size or mtime), by one stat of each file.
        run, changed = ranks.decide(lambda: _plan_job(store, paths))
        writer = f"{run}-r{ranks.rank}"
        pending = [p for p, todo in zip(paths, np.unpackbits(np.frombuffer(changed, np.uint8), count=len(paths))) if todo]
        mine = pending[ranks.rank::ranks.world]
        ranks.barrier()
        summary = ExtractSummary(store=str(out), device=str(where), dtype=dtype)
        counts = _extract_share(
            store, writer, encoder, where, mine, rejects, batch_size, n_views, workers, convert_modes, max_pixels,
            shard_images, progress and ranks.rank == 0,
        )
        rejects.close()
        ranks.barrier()
        total = ranks.sum([counts["extracted"], counts["duplicates"], rejects.total])
        summary.extracted, summary.duplicates, summary.rejected = total
        summary.images_seen = len(paths)
        summary.already_in_store = len(paths) - len(pending)
        summary.reject_reasons = ranks.sum_counts(rejects.counts)
        store = FeatureStore.open(out)  # every rank's shards
        if ranks.rank == 0:
            store.write_count()
        summary.store_images = len(store)
        summary.seconds = round(time.perf_counter() - started, 2)
        summary.images_per_second = round(summary.extracted / summary.seconds, 2) if summary.seconds else 0.0
        if not paths:
            raise ExtractError("the manifests name no images; nothing to extract")
        if summary.extracted == 0 and summary.already_in_store == 0 and summary.duplicates == 0:
            raise ExtractError(f"nothing could be extracted: {counted(summary.rejected, 'input')} rejected, see "
                               f"{rejects_path(out) if len(store) == 0 else out / REJECTS}")
        return summary


@contextmanager
def claimed_store(out: Path, ranks: Ranks) -> Iterator[None]:
    """The store folder locked for the job by rank 0 (a second extraction into it is refused); a store this job
    created is removed again if the job fails without filling it."""
    with ExitStack() as held:
        new_folder = ranks.decide(lambda: _claim_store(out, held))
        try:
            yield
        except Exception:  # nothing extractable, a full disk, …: a store this job made and left empty goes
            if ranks.main and new_folder:
                _remove_empty_store(out)
            raise


def _claim_store(out: Path, held: ExitStack) -> bool:
    """Lock the store folder for the job (a second extraction into it is refused); True when this job creates it."""
    new_folder = not out.exists()
    try:
        held.enter_context(FolderLock(out, "--out store"))
    except AlignError:  # a full disk or a read-only parent: a folder made for the lock goes again
        if new_folder:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return new_folder


def _remove_empty_store(out: Path) -> None:
    """A store this job created and could fill with nothing is removed; its rejects move beside it."""
    try:
        if FeatureStore.open(out).physical_rows:
            return
    except StoreError:  # the job failed before its meta.json was written: nothing of it to keep
        pass
    if (out / REJECTS).is_file() and (out / REJECTS).stat().st_size:
        os.replace(out / REJECTS, rejects_path(out))
    shutil.rmtree(out, ignore_errors=True)


def _plan_job(store: FeatureStore, paths: list[str]) -> tuple[str, bytes]:
    """Rank 0's decisions for a job (holding the store's lock): its writer prefix, and a bit per path that is pending."""
    store.clean_partial_writes()
    return store.next_writer_prefix(), np.packbits([store.current_key(p) is None for p in paths]).tobytes()


def default_workers(images: int, batch_size: int) -> int:
    """Decoding processes: none for a few batches (starting workers costs more than they save), else one per spare
    thread of this process's share of the cores (the encoder keeps one busy), at most 8."""
    if images <= 4 * batch_size:
        return 0
    return max(0, min(8, torch.get_num_threads() - 1))


def _extract_share(
    store: FeatureStore, writer: str, encoder: Encoder, device: torch.device, paths: list[str], rejects: RejectLog,
    batch_size: int, n_views: int, workers: int | None, convert_modes: bool, max_pixels: int, shard_images: int,
    show_progress: bool,
) -> dict:
    dataset = ImageFiles(paths, encoder.preprocessing, n_views, max_pixels, convert_modes)
    workers = default_workers(len(paths), batch_size) if workers is None else workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list,
                                         worker_init_fn=die_with_parent)
    # Each decoding process takes one of this process's threads (torch gives each worker one), so together they
    # use the share of the cores this job was given, not more.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - workers))
    try:
        return _encode_batches(store, writer, encoder, device, loader, len(paths), rejects, batch_size, shard_images,
                               show_progress)
    finally:
        torch.set_num_threads(threads)


def _encode_batches(store: FeatureStore, writer: str, encoder: Encoder, device: torch.device, loader, total: int,
                    rejects: RejectLog, batch_size: int, shard_images: int, show_progress: bool) -> dict:
    """Encode the loader's batches into the store, committing a shard every `shard_images` images."""
    counts = {"extracted": 0, "duplicates": 0}
    keys: list[str] = []
    uncommitted: set[str] = set()
    rows: list[np.ndarray] = []
    sources: dict[str, str] = {}
    stamps: dict[str, tuple[int, int]] = {}

    def commit() -> None:
        if keys or sources:
            store.commit(writer, list(keys), np.concatenate(rows) if rows else np.zeros((0, *store.row_shape)),
                         dict(sources), dict(stamps))
            keys.clear(), rows.clear(), sources.clear(), stamps.clear(), uncommitted.clear()

    columns = progress_columns("extracting", "{task.fields[rate]} images/s")
    with Progress(*columns, disable=not show_progress, transient=False) as bar:
        task = bar.add_task("extract", total=total, rate="-")
        started = time.perf_counter()
        try:
            for batch in loader:
                fresh = []
                for item in batch:
                    if "reject" in item:
                        rejects.add(item["source"], item["reject"])
                    elif item["key"] in store or item["key"] in uncommitted:
                        # The same bytes again (or a file touched but unchanged): encoded once, its path recorded.
                        sources[item["source"]], stamps[item["source"]] = item["key"], item["stamp"]
                        counts["duplicates"] += 1
                    else:
                        fresh.append(item)
                        uncommitted.add(item["key"])
                if fresh:
                    rows.append(encode(encoder, np.stack([f["pixels"] for f in fresh]), device, batch_size))
                    for item in fresh:
                        keys.append(item["key"])
                        sources[item["source"]], stamps[item["source"]] = item["key"], item["stamp"]
                    counts["extracted"] += len(fresh)
                if len(keys) >= shard_images:
                    commit()
                rate = counts["extracted"] / max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=len(batch), rate=f"{rate:.1f}")
        finally:
            commit()  # also on Ctrl-C: what was encoded is kept
    return counts
