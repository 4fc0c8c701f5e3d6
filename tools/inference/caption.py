"""`align caption`: batched generation over a manifest into a predictions file that resumes where it stopped."""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout
from rich.progress import Progress

from align.constants import DEFAULT_QUESTION
from align.errors import AlignError
from align.files import open_own, record_job, write_atomic
from align.templates import conversation_from_record
from align.tools.generation import GenerationOptions
from align.tools.manifest import ManifestRecord, image_refs, read_manifest, resolve_image
from align.tools.images import read_image
from align.tools.runtime import progress_columns
from align.tools.pipeline import Pipeline
from align.tools.rejects import RejectLog, rejects_path



@dataclass
class CaptionSummary:
    """What one `align caption` run did."""

    out: str
    captioned: int = 0
    already_done: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


def question_of(record: dict, default_prompt: str) -> tuple[str, str | None]:
    """(question, reference): a conversation's first question and answer, or the prompt (and a caption, if any)."""
    if "conversations" not in record and "messages" not in record:
        caption = record.get("caption")
        return default_prompt, caption if isinstance(caption, str) else None
    conversation = conversation_from_record(record)  # an invalid conversation is a ConversationError: a reject
    first = conversation.messages[0]
    question = "".join(item for item in first.content if isinstance(item, str)).strip()
    if not question:
        raise AlignError("the record's first turn has no question")
    return question, conversation.messages[1].text if len(conversation.messages) > 1 else None


def _finished_lines(out: Path) -> set[int]:
    """Manifest lines already predicted; a line cut short by an interruption is dropped from the file."""
    if not out.is_file():
        return set()
    kept, done = [], set()
    text = out.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        try:
            record = json.loads(line)
            done.add(int(record["line"]))
            kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    clean = "".join(k + "\n" for k in kept)
    if clean != text:
        # Never rewritten in place: the clean copy is written aside and moved over, so a kill keeps every prediction.
        write_atomic(out, clean)
    return done


def caption_manifest(
    pipeline: Pipeline, manifest: Path, out: Path, *, prompt: str = DEFAULT_QUESTION,
    options: GenerationOptions | None = None, batch_size: int = 8, image_root: Path | None = None, progress: bool = True,
) -> CaptionSummary:
    """Answer every record of a manifest (its own first question, else `prompt`) about its one image."""
    started = time.perf_counter()
    options = options or GenerationOptions(max_new_tokens=64)
    if batch_size < 1:
        raise AlignError(f"batch size must be at least 1, not {batch_size}")
    out = Path(out)
    if out.is_dir():
        raise AlignError(f"--out {out} is a directory; give the predictions file to write")
    if out.resolve() == Path(manifest).resolve():
        raise AlignError(f"--out {out} is the input manifest; write the predictions elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out.with_name(f".{out.name}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise AlignError(f"--out {out} is being written by another align caption; wait for it or give another --out") from None
    try:
        record_job(out.with_name(f"{out.name}.job.json"), caption_job(pipeline, manifest, prompt, options, image_root),
                   out.is_file() and out.stat().st_size > 0, f"--out {out} holds predictions")
        return _caption(pipeline, manifest, out, prompt, options, batch_size, image_root, progress, started)
    finally:
        lock.release()


def caption_job(pipeline: Pipeline, manifest: Path, prompt: str, options: GenerationOptions,
                image_root: Path | None) -> dict:
    """What decides a predictions file: the manifest, the adapter (its config and weights), the prompt, the
    generation options and the image root."""
    return {"manifest": str(Path(manifest).resolve()), "adapter": pipeline.adapter.model_dump(mode="json"),
            "projector": pipeline.projector_digest(), "prompt": prompt, "options": options.as_record(),
            "image_root": str(image_root.resolve()) if image_root else None}


def _caption(pipeline: Pipeline, manifest: Path, out: Path, prompt: str, options: GenerationOptions, batch_size: int,
             image_root: Path | None, progress: bool, started: float) -> CaptionSummary:
    done = _finished_lines(out)
    summary = CaptionSummary(out=str(out))
    rejects = RejectLog(rejects_path(out))
    pending: list[ManifestRecord] = []
    for item in read_manifest(Path(manifest), rejects):
        if item.line in done:
            summary.already_done += 1
            continue
        try:
            refs = image_refs(item.record)
        except AlignError as exc:
            rejects.add(item.where, str(exc))
            continue
        if len(refs) != 1:
            rejects.add(item.where, "a record to caption needs exactly one image")
        else:
            pending.append(item)

    columns = progress_columns("[bold]caption[/bold]", unit="images")
    with open_own(out) as predictions, Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("caption", total=len(pending))
        for i in range(0, len(pending), batch_size):
            batch = []
            for item in pending[i:i + batch_size]:
                ref = image_refs(item.record)[0]
                try:
                    question, reference = question_of(item.record, prompt)
                    rendered = pipeline.prompt([(question, None)], True, options.max_new_tokens)  # it may not fit
                    image = read_image(resolve_image(ref, item.manifest, image_root))
                except AlignError as exc:
                    rejects.add(item.where, str(exc))
                    continue
                batch.append((item, ref, question, reference, image, rendered))
            if batch:
                features = pipeline.image_features([b[4] for b in batch])
                replies = pipeline.generate_batch([b[5] for b in batch], features, options)
                for (item, ref, question, reference, _, _), reply in zip(batch, replies):
                    record = {"line": item.line, "image": ref, "question": question, "prediction": reply}
                    if reference is not None:
                        record["reference"] = reference
                    predictions.write(json.dumps(record, ensure_ascii=False) + "\n")
                predictions.flush()  # a finished batch survives an interruption
                summary.captioned += len(batch)
            bar.update(task, advance=len(pending[i:i + batch_size]))
    rejects.close()
    summary.rejected = rejects.total
    summary.reject_reasons = dict(rejects.counts)
    summary.seconds = round(time.perf_counter() - started, 2)
    summary.images_per_second = round(summary.captioned / summary.seconds, 2) if summary.seconds else 0.0
    return summary
