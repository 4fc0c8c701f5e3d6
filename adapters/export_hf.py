"""An adapter as a directory transformers alone loads: `Blip2ForConditionalGeneration` (the encoder's vision model,
Q-Former and query tokens; the linear projector as `language_projection`; the backbone's LLM as `language_model`),
its processor (the encoder's preprocessing, the backbone's tokenizer with an image token) and a chat template that
puts the image tokens exactly where align puts its slots. Safetensors only, no remote code.

The chat template is read off align's own rendering of probe conversations (system, image, questions, replies as
sentinels), then checked: every probe must tokenize through the template to exactly align's ids, or the export is
refused (a template whose pieces tokenize differently joined than apart cannot be one string).
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from align.adapters.adapter_files import AdapterError, inference_template, load_adapter
from align.backbones import model_dir
from align.backbones.llm import load_frozen_llm
from align.backbones.native import layout_for
from align.backbones.registry import backbone_tokenizer, get_backbone
from align.backbones.vision import load_encoder
from align.files import staged
from align.templates import Template, render, stop_ids
from align.templates.render import IMAGE_TEXT
from align.templates.conversation import conversation_from_turns

IMAGE_TOKEN = "<image>"
# Sentinels the probes render in place of the texts; none is touched by any template's formatting.
SYSTEM, QUESTION, REPLY = "⟦SYSTEM⟧", "⟦QUESTION{}⟧", "⟦REPLY{}⟧"
PROBE_TURNS = 3


def chat_template(template: Template, tokenizer, system: str | None, num_query_tokens: int) -> str:
    """A Jinja chat template writing what `template` writes for a conversation with one image in its first user
    message: system text (or `system` when the messages have none), the image's query tokens, turns, and the
    assistant's opening when `add_generation_prompt`."""
    text = _probe(template, tokenizer, PROBE_TURNS, with_system=system is not None).text
    pieces, rest = [], text
    marks = ([SYSTEM] if system is not None else []) + [IMAGE_TEXT]
    for k in range(PROBE_TURNS):
        marks += [QUESTION.format(k)] + ([REPLY.format(k)] if k < PROBE_TURNS - 1 else [])
    for mark in marks:
        before, found, rest = rest.partition(mark)
        if not found:
            raise AdapterError(f"template '{template.name}' does not write its parts in order: no {mark} in {text!r}")
        pieces.append(before)
    pieces.append(rest)
    offset = 1 if system is not None else 0
    head, after_system = pieces[0], pieces[1] if system is not None else ""
    before_question, question_end = pieces[offset + 1], pieces[offset + 2]
    reply_end, later_question_end = pieces[offset + 3], pieces[offset + 4]
    generation = pieces[-1]
    # (the opening of a reply to generate may differ from a written reply's: Vicuna's "ASSISTANT:" then " reply")
    if later_question_end != question_end or pieces[offset + 5] != reply_end:
        raise AdapterError(f"template '{template.name}' writes its turns irregularly; no single chat template repeats it")

    def literal(value: str) -> str:
        return json.dumps(value, ensure_ascii=False)

    image = IMAGE_TOKEN * num_query_tokens
    system_line = (f"{{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else {literal(system)} -%}}"
                   if system is not None else "")
    # message content: a string, or parts ({"type": "image"} and {"type": "text", "text": ...})
    return "".join([
        system_line,
        "{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}",
        "{{- " + literal(head) + (" + system + " + literal(after_system) if system is not None else "") + " -}}",
        "{%- for message in turns -%}",
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}",
        "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
        " | join('\\n') -%}{%- endif -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- if loop.first -%}{{- " + literal(image) + " + " + literal(before_question) + " -}}{%- endif -%}",
        "{{- text -}}",
        "{%- if not loop.last -%}{{- " + literal(question_end) + " -}}{%- endif -%}",
        "{%- else -%}{{- text + " + literal(reply_end) + " -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + literal(generation) + " -}}{%- endif -%}",
    ])


def _probe(template: Template, tokenizer, turns: int, with_system: bool, texts: list[str] | None = None,
           num_query_tokens: int = 1):
    """align's rendering of a conversation of `turns` questions (the last unanswered) about one image, with `texts`
    (system, then questions and replies in turn; by default the sentinels) in place."""
    texts = texts or [SYSTEM] + [t for k in range(turns) for t in (QUESTION.format(k), REPLY.format(k))]
    system, said = texts[0], texts[1:]
    pairs = [(said[2 * k], said[2 * k + 1] if k < turns - 1 else None) for k in range(turns)]
    return render(template, conversation_from_turns(pairs, with_image=True), tokenizer,
                  system=system if with_system else None, num_query_tokens=num_query_tokens)


def export_hf(adapter: Path, out: Path, *, encoder: Path, model: Path | None = None,
              say: Callable[[str], None] = print) -> Path:
    """Write the transformers directory of `adapter` (its encoder and its backbone's LLM with it) to `out`."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers import BlipImageProcessorPil, GenerationConfig

    config, state = load_adapter(Path(adapter))
    if config.projector != "linear":
        raise AdapterError(f"BLIP-2's language_projection is one linear layer; adapter {adapter} has a "
                           f"{config.projector} projector and cannot be exported")
    spec = get_backbone(config.backbone)
    model = Path(model) if model else (Path(spec.model_path) if spec.model_path else None)
    if spec.tokenizer not in ("hf", "sentencepiece", "qwen-tiktoken"):
        raise AdapterError(f"backbone '{spec.name}' reads its text with a {spec.tokenizer} tokenizer, which "
                           "transformers loads only through remote code: it cannot be exported")
    native = layout_for(model_dir.model_config(model)) if model is not None else None
    if native is not None:
        _transformers_base(native.loading_class, spec.name)  # refused before anything heavy loads
    loaded = load_encoder(encoder)
    config.check_encoder(num_query_tokens=loaded.row_shape[0], in_features=loaded.row_shape[1], where=str(adapter))
    if config.encoder_fingerprint is not None and not loaded.made(config.encoder_fingerprint):
        raise AdapterError(f"adapter {adapter} was trained on features of encoder {config.encoder_fingerprint}, "
                           f"not of {loaded.source}")
    ours = backbone_tokenizer(spec, model)
    template = inference_template(config, spec, ours, model, str(adapter))
    system = (spec.system if spec.system is not None else template.default_system) if template.supports_system else None
    queries = config.num_query_tokens
    jinja = chat_template(template, ours, system, queries)

    hf_tokenizer = _hf_tokenizer(spec.tokenizer, model, ours)
    pre = loaded.preprocessing
    # PIL's bicubic, as align's own preprocessing (torchvision's would resize differently)
    image_processor = BlipImageProcessorPil(size={"height": pre.image_size, "width": pre.image_size},
                                         image_mean=list(pre.mean), image_std=list(pre.std), resample=3,
                                         do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)
    # num_query_tokens stays unset in the processor: its chat template places the image tokens, where align does.
    # The chat template travels with the tokenizer: transformers' Blip2Processor drops its own on loading.
    hf_tokenizer.chat_template = jinja
    processor = Blip2Processor(image_processor=image_processor, tokenizer=hf_tokenizer)
    image_id = hf_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    _check_tokenization(template, ours, processor, system, queries, image_id)

    say(f"loading the LLM of '{spec.name}'")
    llm = load_frozen_llm(spec, model, dtype="auto")
    text_config = _transformers_config(llm, spec.name)
    base = _transformers_base(type(llm), spec.name)
    if type(llm) is not base:
        # A native layout's class would save its weights back in the official layout's names: the same tensors go
        # into the transformers class it extends, which saves them under that class's own.
        with torch.device("meta"):
            plain = base(base.config_class.from_dict(text_config))
        plain.load_state_dict(llm.state_dict(), assign=True)
        llm = plain.eval()
    rows = llm.get_input_embeddings().weight.shape[0]
    if image_id >= rows:
        llm.resize_token_embeddings(image_id + 1, mean_resizing=False)
    blip = Blip2Config(vision_config=loaded.config.vision_config.to_dict(),
                       qformer_config=loaded.config.qformer_config.to_dict(), text_config=text_config,
                       num_query_tokens=queries, image_token_index=image_id)
    with torch.device("meta"):
        exported = Blip2ForConditionalGeneration(blip)
    exported.vision_model, exported.qformer = loaded.module.vision_model, loaded.module.qformer
    exported.query_tokens = loaded.module.query_tokens
    projection = nn.Linear(config.in_features, config.out_features)
    projection.load_state_dict(state)
    exported.language_projection = projection.to(llm.dtype)
    exported.language_model = llm
    stops = stop_ids(template, ours)
    exported.generation_config = GenerationConfig(
        eos_token_id=stops, pad_token_id=ours.pad_id, do_sample=False, max_new_tokens=256,
        # never picked, as align never picks them: rows past the tokenizer's ids, and the image token
        suppress_tokens=sorted(set(range(ours.vocab_size, max(rows, image_id + 1))) | {image_id}))
    with staged(Path(out)) as staging:
        exported.save_pretrained(staging, max_shard_size=_shard_size(model))
        processor.save_pretrained(staging)
    say(f"exported {out}: Blip2ForConditionalGeneration over '{spec.name}', template '{template.name}'")
    return Path(out)


def _check_tokenization(template: Template, ours, processor, system: str | None, queries: int, image_id: int) -> None:
    """Refuse the export unless the chat template tokenizes probe conversations to exactly align's ids."""
    words = ["Be brief.", "What is in this image?", "A red circle.", "And its colour?", "Red.", "Describe it."]
    for turns in (1, 2, 3):
        said = words[1:1 + 2 * turns - 1]
        rendered = _probe(template, ours, turns, system is not None, [words[0], *said], queries)
        messages = ([{"role": "system", "content": words[0]}] if system is not None else [])
        for k, text in enumerate(said):
            content = [{"type": "image"}, {"type": "text", "text": text}] if k == 0 else text
            messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": content})
        # as a user runs it: the tokenizer's chat template, then the processor on the text (no special tokens
        # added: the template writes them where align does)
        prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        theirs = processor(text=prompt, add_special_tokens=False)["input_ids"][0]
        expected = list(rendered.input_ids)
        for start, length in rendered.images:
            expected[start:start + length] = [image_id] * length
        if list(theirs) != expected:
            raise AdapterError(f"template '{template.name}' cannot be written as one chat template for this tokenizer: "
                               f"a {turns}-turn conversation tokenizes to other ids than align's")


def _hf_tokenizer(kind: str, model: Path, ours):
    """The backbone's tokenizer as transformers loads it without remote code: its own files; for a SentencePiece
    model whose files name remote code (Baichuan), LLaMA's tokenizer over its tokenizer.model; for Qwen-1's
    tiktoken ranks, a fast tokenizer converted from them (NFC first, as Qwen's own)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if kind == "qwen-tiktoken":
        from tokenizers import normalizers
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter

        from align.backbones.tokenizers.qwen_tiktoken import ENDOFTEXT, QWEN_PATTERN

        converted = TikTokenConverter(vocab_file=str(model / "qwen.tiktoken"), pattern=QWEN_PATTERN,
                                      extra_special_tokens=dict(ours.controls)).converted()
        converted.normalizer = normalizers.NFC()
        return PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=ENDOFTEXT,
                                       pad_token=ours.id_to_token(ours.pad_id))
    try:
        return AutoTokenizer.from_pretrained(str(model), trust_remote_code=False)
    except (ValueError, OSError) as exc:
        if kind != "sentencepiece" or not (model / "tokenizer.model").is_file():
            raise AdapterError(f"transformers cannot load the tokenizer of {model} without remote code: "
                               f"{str(exc).splitlines()[0][:200]}") from None
        return LlamaTokenizer(vocab_file=str(model / "tokenizer.model"), add_bos_token=False, add_eos_token=False,
                              legacy=False)


def _transformers_config(llm, backbone: str) -> dict:
    """The LLM's config as a transformers architecture: a native layout (Qwen-1 as Qwen2, Baichuan-7B as LLaMA) is
    saved as the transformers class it extends; one transformers does not have (Baichuan-13B's ALiBi) is refused."""
    base = _transformers_base(type(llm), backbone)
    fields = {k: v for k, v in llm.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    return {**base.config_class(**fields).to_dict(), "architectures": [base.__name__]}


def _transformers_base(model_class: type, backbone: str) -> type:
    """The transformers class a model class is or extends; refused when there is none."""
    import transformers

    base = next((cls for cls in model_class.__mro__ if cls.__module__.startswith("transformers.models.")
                 and getattr(transformers, cls.__name__, None) is cls), None)
    if base is None:
        raise AdapterError(f"backbone '{backbone}' is a {model_class.__name__}, an architecture transformers does "
                           "not have: it cannot be exported")
    return base


def _shard_size(model: Path) -> int:
    """The largest weights file of the source model: the export is sharded alike."""
    files = list(model.glob("*.safetensors")) + list(model.glob("*.bin"))
    return max((f.stat().st_size for f in files), default=5 * 2**30) + 2**20
