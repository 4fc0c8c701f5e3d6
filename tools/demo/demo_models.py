"""The tiny models of `align demo`, built on the spot: a BLIP-2-shaped encoder from the real transformers classes,
a byte-level BPE tokenizer with ChatML controls, and a Qwen2-architecture LLM taught the caption language text-only;
and for `align bench transfer` a second LLM unlike it (LLaMA architecture over a SentencePiece vocabulary)."""

import io
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Blip2Config, LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from align.adapters.batch import pad_batch
from align.backbones.chat_templates import template_for
from align.backbones.spec import BackboneSpec
from align.backbones.vision.blip2 import BlipEncoder, Encoder, build_encoder, save_encoder
from align.backbones.vision.preprocessing import Preprocessing
from align.templates import Rendered, conversation_from_record, get_template, render
from align.templates.conversation import conversation_from_turns
from align.templates.text_tokenizer import TextTokenizer
from align.tools.demo.demo_world import CAPTIONS, QUESTIONS, Content, caption, conversation, every_content

IMAGE_SIZE, PATCH, QUERIES, WIDTH = 32, 16, 8, 32
CONTROLS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_demo_encoder(out: Path, seed: int = 0) -> Encoder:
    """A 2-layer vision transformer and 2-layer Q-Former with random weights, written in align's encoder layout.

    Random weights at this scale keep colour and layout apart well enough for a linear projector to read them.
    """
    config = Blip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=PATCH),
        qformer_config=dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=48, cross_attention_frequency=1, vocab_size=32, max_position_embeddings=64),
        num_query_tokens=QUERIES,
    )
    torch.manual_seed(seed)
    module = BlipEncoder(config)
    with torch.no_grad():
        for name, weight in module.named_parameters():
            if weight.dim() > 1 or name == "query_tokens":
                weight.normal_(0, 0.2)
    encoder = build_encoder(config, module.state_dict(), "align demo (random tiny BLIP-2)",
                            Preprocessing(image_size=IMAGE_SIZE))
    save_encoder(encoder, out)
    return encoder


def corpus() -> list[str]:
    """Every sentence of the demo's language, plus the templates' own words."""
    lines = [c.format(colour=x.colour, shape=x.shape) for x in every_content() for c in CAPTIONS]
    lines += [f"{q} {a.format(colour=x.colour, shape=x.shape)}" for x in every_content() for q, a in QUESTIONS]
    lines += ["system user assistant <Img></Img>", "You are a helpful assistant."]
    return lines


def build_demo_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE (any text encodes) learnt from the demo corpus, with ChatML control tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CONTROLS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus() * 4, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def build_demo_sentencepiece(out: Path, vocab_size: int) -> None:
    """A SentencePiece BPE (byte fallback: any text encodes) learnt from the demo corpus, as LLaMA's tokenizer.model."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus() * 4), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())


def build_demo_llama(spec: BackboneSpec, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer LLaMA-architecture LLM with the backbone's hidden and vocab sizes, randomly initialised."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def build_demo_llm(spec: BackboneSpec, seed: int = 0) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2-architecture LLM with the backbone's hidden and vocab sizes, randomly initialised."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)


def text_example(content: Content, tokenizer: TextTokenizer, spec: BackboneSpec, rng: random.Random
                 ) -> tuple[Rendered, list[list[int]]]:
    """A caption or a chat rendered exactly as training will render it; its image slots will hold the embeddings of
    the content's words (see `pretrain_text`), so the LLM learns to describe what the slots say."""
    if rng.random() < 0.5:
        template = get_template("caption")
        chat = conversation_from_record({"image": "image", "caption": caption(content, rng)})
    else:
        template = template_for(spec, tokenizer)
        chat = conversation_from_turns(conversation(content, rng, turns=rng.choice((1, 2))), with_image=True)
    rendered = render(template, chat, tokenizer, system=spec.system, num_query_tokens=QUERIES)
    return rendered, [tokenizer.encode(" " + content.colour), tokenizer.encode(" " + content.shape)]


def _slot_embedding(embedding: torch.nn.Embedding, words: list[list[int]]) -> torch.Tensor:
    """What an image slot holds in pretraining: the sum of the content words' (mean token) embeddings."""
    return sum(embedding(torch.tensor(ids)).mean(0) for ids in words)


def pretrain_text(llm: PreTrainedModel, tokenizer: TextTokenizer, spec: BackboneSpec, steps: int, seed: int = 0,
                  batch_size: int = 32, on_step=None) -> float:
    """Teach the LLM the caption language (text only, before it is frozen); returns the last loss."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    contents = every_content()
    embedding = llm.get_input_embeddings()
    llm.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        examples = [text_example(rng.choice(contents), tokenizer, spec, rng) for _ in range(batch_size)]
        batch = pad_batch([rendered for rendered, _ in examples], tokenizer.pad_id)
        embeds = embedding(batch.input_ids)
        per_sample = torch.stack([_slot_embedding(embedding, words) for _, words in examples])
        embeds = torch.where(batch.image_mask.unsqueeze(-1), per_sample[:, None, :], embeds)
        loss = llm(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    llm.eval()
    return loss.item()
