"""`align transfer`: fit the word-embedding converter between an adapter's LLM and another registered LLM, compose
it with the adapter's projector, and write the warm-start adapter for the other LLM."""

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from align.adapters.adapter_files import AdapterConfig, AdapterError, load_adapter, save_adapter
from align.adapters.transfer import compose, fit_converter, paired_rows, shared_words
from align.backbones.chat_templates import template_for
from align.backbones.llm import input_embeddings
from align.backbones.registry import backbone_tokenizer, get_backbone
from align.tools.manifest import read_manifest


def corpus_texts(manifest: Path) -> Iterator[str]:
    """The words of a manifest: captions and every turn of its conversations (malformed lines skipped)."""
    for entry in read_manifest(manifest, None):
        record = entry.record
        if isinstance(record.get("caption"), str):
            yield record["caption"]
        for turn in record.get("conversations") or record.get("messages") or []:
            if isinstance(turn, dict):
                text = turn.get("value", turn.get("content"))
                if isinstance(text, str):
                    yield text


def transfer_adapter(adapter: Path, to: str, out: Path, *, corpus: Path | None = None,
                     source_model: Path | None = None, target_model: Path | None = None,
                     say: Callable[[str], None] = print) -> dict:
    """Write the warm-start adapter for backbone `to`; returns what its config records of where it came from."""
    config, state = load_adapter(Path(adapter))
    source, target = get_backbone(config.backbone), get_backbone(to)
    if source.name == target.name:
        raise AdapterError(f"adapter {adapter} is already for '{target.name}': nothing to transfer")
    source_tokenizer = backbone_tokenizer(source, source_model)
    target_tokenizer = backbone_tokenizer(target, target_model)
    corpus_words, vocabulary_words = shared_words(source_tokenizer, target_tokenizer,
                                                  corpus_texts(corpus) if corpus else ())
    say(f"reading the input embeddings of '{source.name}' and '{target.name}'")
    source_table, target_table = input_embeddings(source, source_model), input_embeddings(target, target_model)
    if source_table.shape[1] != config.out_features:
        raise AdapterError(f"adapter {adapter} writes {config.out_features}-wide embeddings; '{source.name}' reads "
                           f"{source_table.shape[1]}")
    groups = [paired_rows(words, source_tokenizer, source_table, target_tokenizer, target_table)
              for words in (corpus_words, vocabulary_words) if words]
    # Each group weighs as much in all as the last (the vocabulary): the corpus's words, the text the model will
    # read, count as much as the rest of the vocabulary together.
    last = len(groups[-1][0])
    weights = torch.cat([torch.full((len(left),), last / len(left)) for left, _ in groups])
    converter = fit_converter(torch.cat([left for left, _ in groups]), torch.cat([right for _, right in groups]),
                              weights)
    say(f"converter fitted on {converter.pairs} shared words: held-out cosine {converter.held_out_cosine:.3f}, "
        f"R² {converter.held_out_r2:.3f}")
    origin = {"adapter": str(Path(adapter).resolve()), "backbone": source.name, "stage": config.stage,
              "step": config.step, "corpus": str(corpus) if corpus else None, "fit": converter.fit_report()}
    warm = AdapterConfig.for_backbone(
        target, projector=config.projector, in_features=config.in_features,
        template=template_for(target, target_tokenizer, model=target_model).name,
        num_query_tokens=config.num_query_tokens, encoder_fingerprint=config.encoder_fingerprint, stage="transferred")
    warm = warm.model_copy(update={"transferred_from": origin})
    save_adapter(Path(out), warm, compose(config.projector, state, converter))
    return origin
