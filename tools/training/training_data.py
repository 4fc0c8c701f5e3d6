"""Training samples: caption records as prompted conversations, conversations that have something to learn, and
micro-batches of cached samples padded and joined to their image features."""

from typing import TYPE_CHECKING

import numpy as np
import torch

from align.adapters.batch import pad_batch
from align.errors import AlignError
from align.templates import Conversation, conversation_from_record
from align.templates.conversation import IMAGE_MARKER
from align.tools.feature_store import ShardRows

if TYPE_CHECKING:
    from align.tools.training.render_cache import CachedSample


def prompted(record: dict, prompt: str | None) -> dict:
    """A caption record as a one-exchange conversation with `prompt` (MiniGPT-4's stage-1/2 style); others as given."""
    if not prompt or "caption" not in record:
        return record
    if IMAGE_MARKER not in prompt:
        prompt = f"{IMAGE_MARKER} {prompt}"
    conversation = {"image": record.get("image", record.get("images")), "conversations": [
        {"from": "human", "value": prompt}, {"from": "gpt", "value": record["caption"]}]}
    return conversation | ({"system": record["system"]} if "system" in record else {})


def training_conversation(record: dict) -> Conversation:
    """A record as a training conversation; one that ends with a user turn has no reply to learn."""
    conversation = conversation_from_record(record)
    if conversation.ends_with_user:
        raise AlignError("nothing to learn: the conversation ends with a user turn, not a reply")
    return conversation


def collate(samples: list["CachedSample"], rows: ShardRows, view: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sample in the micro-batch (right side); gather each image's features for `view`."""
    batch = pad_batch(samples, pad_id)
    # Row -1: a sample muted for broken features (it learns nothing; its slots see zeros).
    blank = np.zeros(rows.row_shape[1:], np.float32)
    features = [np.asarray(rows.get(row)[view], dtype=np.float32) if row >= 0 else blank
                for sample in samples for row in sample.rows]
    stacked = torch.from_numpy(np.stack(features)) if features else torch.zeros((0, *rows.row_shape[1:]))
    return {"input_ids": batch.input_ids, "labels": batch.labels, "attention_mask": batch.attention_mask,
            "image_mask": batch.image_mask, "features": stacked}
