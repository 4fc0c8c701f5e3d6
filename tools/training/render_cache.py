"""The render cache: a stage's samples rendered once (ids, labels, image slots, feature-store rows) into flat
memory-mapped arrays, keyed by everything that decides them, built in parallel and shared by every rank and run.

Layout of one cache (`<cache root>/<key>/`):
  meta.json        the key and what it was made of, counts (samples, tokens, truncated, rejects by reason), the
                   store shards its rows point into, and the prompt table (below)
  *.bin            raw little-endian arrays: tokens/labels (int32, all samples end to end), token_offsets (int64,
                   samples + 1), slots/slot_offsets (image slot starts per sample), rows/row_offsets (the store row
                   of each image, shard index × 2**32 + row), source (int16), line (int64), prompted (int8)
  rejects.jsonl    every record that was skipped, with its reason
A cache is built in `<key>.tmp-<pid>` and renamed into place once whole, so a kill leaves no half cache.

Prompts drawn per (epoch, record): when the template tokenizes the reply as its own run (MiniGPT-4's templates
do), a prompted caption record is stored as its reply alone and joined at batch time to the rendered prefix of the
prompt drawn for that epoch: exactly the rendering of the whole sample with that prompt. The reply is cut to fit
the longest prefix. With other templates the prompt is drawn once per record (epoch 0's draw) and the whole
rendering is stored; `meta.json` says which (`prompts_per_epoch`).
"""

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from rich.progress import Progress

from align.constants import RENDER_CACHE_DIR
from align.cpu_threads import job_cores
from align.errors import AlignError
from align.files import read_json_object, write_atomic, writing
from align.templates import IGNORE_INDEX, render
from align.tools.manifest import line_aligned_chunks, read_manifest, resolve_image
from align.tools.rejects import RejectLog
from align.tools.runtime import die_with_parent, progress_columns
from align.tools.training.training_data import prompted, training_conversation

FORMAT, FORMAT_VERSION = "align-render-cache", 2  # 2: meta.json holds each array's length
RENDER_CODE_VERSION = 1  # bump when a change to rendering changes ids for the same inputs
CHUNK_BYTES = 4 << 20
ARRAYS = {  # name → dtype of every per-cache array
    "tokens": np.int32, "labels": np.int32, "token_offsets": np.int64, "slots": np.int32, "slot_offsets": np.int64,
    "rows": np.int64, "row_offsets": np.int64, "source": np.int16, "line": np.int64, "prompted": np.int8,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "qwen.tiktoken")


@dataclass(frozen=True)
class RenderSettings:
    """Everything that decides a stage's rendered samples, besides the files it reads (hashed into the key)."""

    backbone: str
    model: str
    template: str | None
    system: str | None
    max_length: int
    prompts: tuple[str, ...] | None
    truncate: str
    seed: int
    num_query_tokens: int
    store: str
    manifests: tuple[str, ...]
    image_roots: tuple[str | None, ...]  # per manifest: where its relative image paths start (None: its folder)


def settings_for(recipe, spec, stage, num_query_tokens: int) -> RenderSettings:
    """The render settings of one stage of a recipe (a `Recipe`, its backbone's `BackboneSpec`, a `Stage`)."""
    model = recipe.backbone.model or spec.model_path
    if model is None:
        raise AlignError(f"backbone '{spec.name}' has no local model: set backbone.model or `align add-backbone`")
    return RenderSettings(
        backbone=spec.name, model=str(model), template=stage.template, system=spec.system,
        max_length=stage.max_length, prompts=tuple(stage.prompts) if stage.prompts else None,
        truncate=stage.truncation, seed=recipe.runtime.seed, num_query_tokens=num_query_tokens,
        store=str(recipe.features), manifests=tuple(str(d.manifest) for d in stage.data),
        image_roots=tuple(str(d.image_root) if d.image_root else None for d in stage.data),
    )


def cache_root(recipe) -> Path:
    """Where a run's render caches live."""
    return recipe.runtime.render_cache or recipe.runtime.output_dir / RENDER_CACHE_DIR


def render_workers(recipe) -> int:
    """Processes that build a render cache (while the job's other processes wait): the recipe's number, else one
    per core of the job's share of this machine."""
    return recipe.runtime.render_workers or job_cores()


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with Path(path).open("rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def cache_key(settings: RenderSettings, store_shards: list[str]) -> str:
    """The cache's name: a hash of the settings, the manifests' and tokenizer files' contents, what the store's rows
    mean (its encoder and every shard's index: keys, rows and source paths, not just the shards' names) and the
    rendering code's version."""
    model = Path(settings.model)
    tokenizer_files = {n: _file_digest(model / n) for n in TOKENIZER_FILES if (model / n).is_file()}
    described = {
        "format": [FORMAT, FORMAT_VERSION, RENDER_CODE_VERSION], "settings": asdict(settings),
        "manifests": [_file_digest(Path(m)) for m in settings.manifests], "tokenizer": tokenizer_files,
        "store_shards": store_shards, "store": store_digest(Path(settings.store), store_shards),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def prompt_choice(seed: int, epoch: int, source: np.ndarray, line: np.ndarray, count: int) -> np.ndarray:
    """The prompt index of each (source, line) record in `epoch`: seeded, independent of ranks and batches."""
    from align.tools.training.data_order import _mix, key_of

    key = key_of(seed, epoch)
    with np.errstate(over="ignore"):
        mixed = _mix(_mix(line.astype(np.uint64) ^ key) + source.astype(np.uint64))
    return (mixed % np.uint64(count)).astype(np.int64)


# -- building ------------------------------------------------------------------------------------------------------


class _Collected:
    """A chunk's rejects, kept in order for the parent to log."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, source: str, reason: str) -> None:
        self.items.append((source, reason))


_WORKER: dict = {}


def _pool_worker_start(settings: RenderSettings) -> None:
    """A render worker process: it ends with the builder (never an orphan), then loads what it renders with."""
    die_with_parent()
    _worker_start(settings)


def _worker_start(settings: RenderSettings) -> None:
    """Load tokenizer, template, store index and prompt prefixes once per worker process."""
    from align.backbones.chat_templates import template_for
    from align.backbones.registry import backbone_tokenizer, get_backbone
    from align.tools.feature_store import FeatureStore

    spec = get_backbone(settings.backbone)
    tokenizer = backbone_tokenizer(spec, Path(settings.model))
    template = template_for(spec, tokenizer, name=settings.template, model=Path(settings.model))
    store = FeatureStore.open(settings.store)
    shards = sorted({location.shard for location in store.index.values()})
    _WORKER.update(settings=settings, tokenizer=tokenizer, template=template, store=store, shards=shards,
                   shard_index={s: i for i, s in enumerate(shards)},
                   prefixes=prompt_prefixes(settings, template, tokenizer))


def prompt_prefixes(settings: RenderSettings, template, tokenizer) -> list[dict] | None:
    """Each prompt's rendered prefix (ids, labels, slots) when the template tokenizes a reply as its own run, so a
    reply joins any prefix exactly; None when it does not (or there are no prompts)."""
    if not settings.prompts:
        return None
    prefixes = []
    for prompt in settings.prompts:
        record = prompted({"image": "probe.jpg", "caption": "probe reply"}, prompt)
        try:
            rendered = render(template, training_conversation(record), tokenizer, system=settings.system,
                              num_query_tokens=settings.num_query_tokens)
        except AlignError:
            return None
        first = next(i for i, label in enumerate(rendered.labels) if label != IGNORE_INDEX)
        if not any(start == first for start, _, _ in rendered.runs):
            return None
        prefixes.append({"ids": rendered.input_ids[:first], "labels": rendered.labels[:first],
                         "slots": [start for start, _ in rendered.images]})
    return prefixes


def _render_chunk(task: tuple[int, int, str, int, int, int, str]) -> dict:
    """Render one piece of a manifest into part files; returns its counts and rejects."""
    index, source, manifest, start, end, first_line, out = task
    settings, store, template = _WORKER["settings"], _WORKER["store"], _WORKER["template"]
    tokenizer, prefixes, shard_index = _WORKER["tokenizer"], _WORKER["prefixes"], _WORKER["shard_index"]
    longest = max(range(len(prefixes)), key=lambda p: len(prefixes[p]["ids"])) if prefixes else None
    parts = {name: [] for name in ARRAYS}
    rejects, truncated, samples = _Collected(), 0, 0
    for item in read_manifest(Path(manifest), rejects, start=start, end=end, first_line=first_line):
        try:
            record = item.record
            spliced = prefixes is not None and "caption" in record
            if settings.prompts:
                if spliced:
                    choice = longest  # the reply is cut to fit every prompt's prefix
                else:
                    choice = int(prompt_choice(settings.seed, 0, np.array([source]), np.array([item.line]),
                                               len(settings.prompts))[0])
                record = prompted(record, settings.prompts[choice])
            conversation = training_conversation(record)
            rows = []
            for ref in conversation.images:
                root = settings.image_roots[source]
                key = store.locate(resolve_image(ref, item.manifest, Path(root) if root else None))
                location = store.index[key]
                rows.append((shard_index[location.shard] << 32) + location.row)
            rendered = render(template, conversation, tokenizer, system=settings.system,
                              num_query_tokens=settings.num_query_tokens, max_length=settings.max_length,
                              truncate=settings.truncate)
        except AlignError as exc:
            rejects.add(item.where, str(exc))
            continue
        ids, labels, slots = rendered.input_ids, rendered.labels, [s for s, _ in rendered.images]
        if spliced:
            prefix = prefixes[longest]
            cut = len(prefix["ids"])
            if ids[:cut] != prefix["ids"] or slots != prefix["slots"]:
                rejects.add(item.where, "the prompt renders differently for this record")
                continue
            ids, labels, slots = ids[cut:], labels[cut:], []
        rows = [rows[i] for i in rendered.image_indices]
        parts["tokens"].append(np.asarray(ids, dtype=np.int32))
        parts["labels"].append(np.asarray(labels, dtype=np.int32))
        parts["slots"].append(np.asarray(slots, dtype=np.int32))
        parts["rows"].append(np.asarray(rows, dtype=np.int64))
        for name, value in (("token_offsets", len(ids)), ("slot_offsets", len(slots)), ("row_offsets", len(rows)),
                            ("source", source), ("line", item.line), ("prompted", 1 if spliced else 0)):
            parts[name].append(value)
        truncated += rendered.truncated
        samples += 1
    for name, dtype in ARRAYS.items():
        values = parts[name]
        if name in ("tokens", "labels", "slots", "rows"):
            array = np.concatenate(values) if values else np.zeros(0, dtype)
        else:
            array = np.asarray(values, dtype=dtype)  # lengths, turned into offsets by the parent
        (Path(out) / f"{index:06d}.{name}").write_bytes(array.astype(dtype).tobytes())
    return {"index": index, "samples": samples, "truncated": truncated, "rejects": rejects.items,
            "records": samples + len(rejects.items)}


def build_cache(settings: RenderSettings, root: Path, workers: int, progress: bool) -> Path:
    """Render every manifest of `settings` into a new cache under `root` (in `workers` processes); its folder. One
    builder per key at a time: a second run sharing the cache root waits for the first and reuses its cache."""
    key = cache_key(settings, store_shard_names(Path(settings.store)))
    if (root / key / "meta.json").is_file() and damage(root / key) is None:
        return root / key  # a finished cache is never written again: reused without the lock (a read-only root)
    with writing(root):
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(root / f".{key}.lock")
        lock.acquire()
    try:
        return _build_locked(settings, root, key, workers, progress)
    finally:
        lock.release()


def _build_locked(settings: RenderSettings, root: Path, key: str, workers: int, progress: bool) -> Path:
    final = root / key
    if (final / "meta.json").is_file():
        problem = damage(final)
        if problem is None:
            return final
        print(f"note: render cache {final} is damaged ({problem}); building it again", file=sys.stderr, flush=True)
        shutil.rmtree(final)
    started = time.perf_counter()
    for stale in root.glob(f"{key}.tmp-*"):  # a killed builder's (the lock says no builder of this key is alive)
        shutil.rmtree(stale, ignore_errors=True)
    work = root / f"{key}.tmp-{os.getpid()}"
    try:
        with writing(root):
            _render_into(work, settings, key, workers, progress, started)
    except BaseException:  # a full disk, a bad manifest, Ctrl-C: no half-built cache is left behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        os.replace(work, final)
    except OSError:  # another builder (a node sharing this folder) finished first: its cache is the same
        shutil.rmtree(work, ignore_errors=True)
    return final


def _render_into(work: Path, settings: RenderSettings, key: str, workers: int, progress: bool, started: float) -> None:
    """Render every manifest's chunks (in `workers` processes) and join them into the cache's files in `work`."""
    parts = work / "parts"
    parts.mkdir(parents=True)
    tasks = []
    for source, manifest in enumerate(settings.manifests):
        if not Path(manifest).is_file():
            raise AlignError(f"manifest {manifest} does not exist")
        for start, end, line in line_aligned_chunks(Path(manifest), CHUNK_BYTES):
            tasks.append((len(tasks), source, manifest, start, end, line, str(parts)))
    _worker_start(settings)  # here too: the prompt table, and the chunks when rendering in this process
    total_bytes = sum(task[4] - task[3] for task in tasks)
    results: dict[int, dict] = {}
    columns = progress_columns("[bold]render[/bold]", "{task.fields[records]} records")
    with Progress(*columns, disable=not progress) as bar:
        task_id = bar.add_task("render", total=total_bytes, records=0)
        done = 0

        def collect(result: dict) -> None:
            nonlocal done
            results[result["index"]] = result
            done += result["records"]
            chunk = tasks[result["index"]]
            bar.update(task_id, advance=chunk[4] - chunk[3], records=done)

        if workers <= 1 or len(tasks) == 1:
            for task in tasks:
                collect(_render_chunk(task))
        else:
            context = multiprocessing.get_context("spawn")  # torch and the process group may be live here
            with context.Pool(workers, initializer=_pool_worker_start, initargs=(settings,)) as pool:
                for result in pool.imap_unordered(_render_chunk, tasks):
                    collect(result)
    meta = _join_parts(parts, work, [results[i] for i in range(len(tasks))], settings)
    meta.update(key=key, seconds=round(time.perf_counter() - started, 3))
    write_atomic(work / "meta.json", json.dumps(meta, indent=1))
    shutil.rmtree(parts)


def store_digest(store: Path, shards: list[str]) -> str:
    """A hash of what a store's rows mean: its encoder fingerprint and each committed shard's index file. A store
    deleted and extracted again in another order into the same path has other contents under the same names."""
    from align.constants import STORE_META, STORE_SHARDS

    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(read_json_object(store / STORE_META).get("encoder_fingerprint")).encode())
    for name in shards:
        digest.update(name.encode())
        digest.update(bytes.fromhex(_file_digest(store / STORE_SHARDS / f"{name}.json")))
    return digest.hexdigest()


def store_shard_names(store: Path) -> list[str]:
    """The committed shards of a store, by name (what a cache's rows point into)."""
    from align.constants import STORE_SHARDS

    return sorted(p.stem for p in (store / STORE_SHARDS).glob("*.json"))


def _join_parts(parts: Path, work: Path, results: list[dict], settings: RenderSettings) -> dict:
    """Concatenate the chunks' part files in order into the cache's arrays; lengths become offsets."""
    rejects = RejectLog(work / "rejects.jsonl")
    for result in results:
        for where, reason in result["rejects"]:
            rejects.add(where, reason)
    rejects.close()
    offsets = {"token_offsets": 0, "slot_offsets": 0, "row_offsets": 0}
    files = {name: (work / f"{name}.bin").open("wb") for name in ARRAYS}
    for name in offsets:
        files[name].write(np.zeros(1, np.int64).tobytes())
    lengths = {name: int(name in offsets) for name in ARRAYS}
    for result in results:
        for name, dtype in ARRAYS.items():
            data = np.frombuffer((parts / f"{result['index']:06d}.{name}").read_bytes(), dtype=dtype)
            if name in offsets:
                data = offsets[name] + np.cumsum(data, dtype=np.int64)
                offsets[name] = int(data[-1]) if len(data) else offsets[name]
            files[name].write(data.tobytes())
            lengths[name] += len(data)
    for file in files.values():
        file.flush()
        os.fsync(file.fileno())
        file.close()
    prefixes = _WORKER["prefixes"]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "settings": asdict(settings), "lengths": lengths,
        "template": _WORKER["template"].name,
        "samples": sum(r["samples"] for r in results), "tokens": offsets["token_offsets"],
        "truncated": sum(r["truncated"] for r in results), "rejected": rejects.total,
        "rejects_by_reason": dict(rejects.counts), "store_shards": _WORKER["shards"],
        "row_shape": list(_WORKER["store"].row_shape),
        "prompts_per_epoch": prefixes is not None, "prefixes": prefixes or [],
        "samples_per_source": np.bincount(
            np.fromfile(work / "source.bin", dtype=np.int16).astype(np.int64), minlength=len(settings.manifests)
        ).tolist(),
    }


# -- reading -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedSample:
    """One sample as the model sees it (the `RenderedLike` of `pad_batch`), with its images' store rows."""

    input_ids: list[int]
    labels: list[int]
    images: list[tuple[int, int]]
    rows: list[int]


def damage(path: Path) -> str | None:
    """What is wrong with a built cache (an unreadable meta.json, an array of the wrong size), or None."""
    try:
        meta = read_json_object(path / "meta.json")
    except AlignError as exc:
        return str(exc)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        return f"not an {FORMAT} v{FORMAT_VERSION}"
    lengths = meta.get("lengths") or {}
    for name, dtype in ARRAYS.items():
        file = path / f"{name}.bin"
        expected = lengths.get(name, -1) * np.dtype(dtype).itemsize
        actual = file.stat().st_size if file.is_file() else -1
        if actual != expected:
            return f"{file.name} holds {actual} bytes, not {expected}"
    return None


class RenderCache:
    """Read access to a built cache: every array a read-only memory map, so ranks share one copy in the page cache."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if problem := damage(self.path):
            raise AlignError(f"render cache {self.path} is damaged ({problem}); delete it and run again")
        self.meta = read_json_object(self.path / "meta.json")
        self.arrays = {name: _map(self.path / f"{name}.bin", dtype) for name, dtype in ARRAYS.items()}
        self.queries = self.meta["settings"]["num_query_tokens"]
        self.seed = self.meta["settings"]["seed"]
        self.prefixes = self.meta["prefixes"]

    def __len__(self) -> int:
        return int(self.meta["samples"])

    @property
    def samples_per_source(self) -> list[int]:
        """Samples of each manifest, in recipe order."""
        return self.meta["samples_per_source"]

    def where(self, sample: int) -> str:
        """`manifest:line` of a sample, for rejects."""
        a = self.arrays
        return f"{self.meta['settings']['manifests'][int(a['source'][sample])]}:{int(a['line'][sample])}"

    def samples(self, ids: np.ndarray, epoch: int) -> list[CachedSample]:
        """Samples `ids` as rendered for `epoch` (a prompted record gets that epoch's prompt)."""
        a = self.arrays
        ids = np.asarray(ids, dtype=np.int64)
        choices = (prompt_choice(self.seed, epoch, a["source"][ids], a["line"][ids], len(self.prefixes))
                   if self.prefixes else np.zeros(len(ids), np.int64))
        out = []
        for i, choice in zip(ids.tolist(), choices.tolist()):
            tokens = a["tokens"][a["token_offsets"][i]:a["token_offsets"][i + 1]].tolist()
            labels = a["labels"][a["token_offsets"][i]:a["token_offsets"][i + 1]].tolist()
            slots = a["slots"][a["slot_offsets"][i]:a["slot_offsets"][i + 1]].tolist()
            rows = a["rows"][a["row_offsets"][i]:a["row_offsets"][i + 1]].tolist()
            if a["prompted"][i]:
                prefix = self.prefixes[choice]
                shift = len(prefix["ids"])
                tokens, labels = prefix["ids"] + tokens, prefix["labels"] + labels
                slots = prefix["slots"] + [s + shift for s in slots]
            out.append(CachedSample(tokens, labels, [(s, self.queries) for s in slots], rows))
        return out


def _map(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")
