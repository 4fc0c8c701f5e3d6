"""Training samples: manifest records rendered by the template and joined to the feature store by image key;
deterministic, length-grouped global batches; dynamic padding."""

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from align.adapters.batch import pad_batch
from align.errors import AlignError
from align.templates import Conversation, Template, conversation_from_record, render
from align.templates.conversation import IMAGE_MARKER
from align.templates.text_tokenizer import TextTokenizer
from align.tools.feature_store import FeatureStore
from align.tools.manifest import image_refs, read_manifest, resolve_image
from align.tools.rejects import RejectLog


@dataclass(frozen=True)
class Sample:
    """One rendered training sample and the store keys of its images, in slot order."""

    input_ids: list[int]
    labels: list[int]
    images: list[tuple[int, int]]
    keys: list[str]
    source: int  # index of the manifest it came from


def prompted(record: dict, prompts: list[str] | None, rng: random.Random) -> dict:
    """A caption record as a one-exchange conversation with a random prompt (MiniGPT-4's stage-1/2 style)."""
    if not prompts or "caption" not in record:
        return record
    prompt = rng.choice(prompts)
    if IMAGE_MARKER not in prompt:
        prompt = f"{IMAGE_MARKER} {prompt}"
    return {"image": record.get("image"), "conversations": [
        {"from": "human", "value": prompt}, {"from": "gpt", "value": record["caption"]}]}


def training_conversation(record: dict) -> Conversation:
    """A record as a training conversation; one that ends with a user turn has no reply to learn."""
    conversation = conversation_from_record(record)
    if conversation.ends_with_user:
        raise AlignError("nothing to learn: the conversation ends with a user turn, not a reply")
    return conversation


def build_samples(
    manifests: list[Path], store: FeatureStore, template: Template, tokenizer: TextTokenizer, *,
    system: str | None, max_length: int, prompts: list[str] | None, seed: int, rejects: RejectLog | None,
    image_root: Path | None = None,
) -> list[list[Sample]]:
    """Samples per manifest; anything that fails to render or lacks features is skipped (and logged to `rejects`)."""
    num_queries = store.row_shape[1]
    per_source: list[list[Sample]] = []
    for source, manifest in enumerate(manifests):
        samples = []
        for item in read_manifest(manifest, rejects):
            rng = random.Random(f"{seed}:{manifest}:{item.line}")  # the same prompt on every run and rank
            try:
                record = prompted(item.record, prompts, rng)
                keys = []
                for ref in image_refs(record):
                    key = store.find(resolve_image(ref, manifest, image_root))
                    if key is None:
                        raise AlignError(f"image {ref} is not in the feature store")
                    keys.append(key)
                rendered = render(template, training_conversation(record), tokenizer, system=system,
                                  num_query_tokens=num_queries, max_length=max_length)
            except AlignError as exc:
                if rejects is not None:
                    rejects.add(item.where, str(exc))
                continue
            samples.append(Sample(rendered.input_ids, rendered.labels, rendered.images,
                                  [keys[i] for i in rendered.image_indices], source))
        per_source.append(samples)
    return per_source


class BatchPlan:
    """Which samples form each global batch: a pure function of (seed, epoch, step), so runs resume exactly."""

    def __init__(self, per_source: list[list[Sample]], ratios: list[float], global_batch: int, seed: int):
        self.per_source, self.global_batch, self.seed = per_source, global_batch, seed
        live = [(i, r) for i, r in enumerate(ratios) if per_source[i]]
        if not live:
            raise AlignError("no usable training samples (see the stage's rejects.jsonl)")
        self.sources = [i for i, _ in live]
        total = sum(r for _, r in live)
        self.weights = [r / total for _, r in live]
        self.size = sum(len(per_source[i]) for i in self.sources)

    @property
    def steps_per_pass(self) -> int:
        """Global batches in one pass over the data (at least one)."""
        return max(1, self.size // self.global_batch)

    def batch(self, epoch: int, step: int) -> list[Sample]:
        """The global batch `step` of `epoch`, sorted by length so micro-batches pad little."""
        rng = np.random.default_rng([self.seed, epoch, step])
        chosen = rng.choice(self.sources, size=self.global_batch, p=self.weights)
        # Each source is walked in its own per-epoch order, so one source visits every sample once per pass.
        orders = {int(s): np.random.default_rng([self.seed, epoch, int(s)]).permutation(len(self.per_source[s]))
                  for s in set(chosen.tolist())}
        picks = []
        for source in chosen.tolist():
            samples = self.per_source[source]
            cursor = (step * self.global_batch + len(picks)) % len(samples)
            picks.append(samples[orders[source][cursor]])
        return sorted(picks, key=lambda s: len(s.input_ids))


def collate(samples: list[Sample], store: FeatureStore, view: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sample in the micro-batch (right side); gather each image's features for `view`."""
    batch = pad_batch(samples, pad_id)
    rows = [np.asarray(store.get(key)[view], dtype=np.float32) for sample in samples for key in sample.keys]
    features = torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, *store.row_shape[1:]))
    return {"input_ids": batch.input_ids, "labels": batch.labels, "attention_mask": batch.attention_mask,
            "image_mask": batch.image_mask, "features": features}
