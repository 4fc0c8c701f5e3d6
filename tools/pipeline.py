"""An adapter directory loaded with its backbone, frozen LLM and frozen encoder: what chat, captioning and evaluation
generate with (shared by those rooms).

```python
from align.tools.pipeline import Pipeline
pipe = Pipeline.load("runs/x/chat/adapter", encoder="blip2-encoder")
print(pipe.generate("cat.jpg", "What is in this image?"))
```
"""

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from align.adapters.adapter_files import AdapterConfig, AdapterError, inference_template, load_adapter
from align.adapters.projector import build_projector
from align.adapters.vision_llm import VisionLLM
from align.backbones.llm import load_frozen_llm
from align.backbones.registry import backbone_tokenizer, get_backbone
from align.backbones.vision import Encoder, default_compute_dtype, encode, load_encoder
from align.backbones.vision.preprocessing import eval_view
from align.errors import AlignError
from align.templates import Rendered, Template, render, stop_ids
from align.templates.conversation import conversation_from_turns
from align.tools.feature_store import FeatureStore
from align.tools.images import ImageInput, read_image
from align.tools.generation import GenerationOptions, Reply, Stops, TurnCache, generate_replies
from align.tools.runtime import local_device

Turn = tuple[str, str | None]  # (question, reply); the reply is None for the turn being asked


class Pipeline:
    """A trained projector between a frozen encoder and a frozen LLM, in the backbone's own chat template."""

    def __init__(self, adapter: AdapterConfig, model: VisionLLM, tokenizer, encoder: Encoder | None, spec, device,
                 template: Template):
        self.adapter, self.model, self.tokenizer, self.encoder, self.spec = adapter, model, tokenizer, encoder, spec
        self.device = device
        self.template = template
        self.stops = Stops(tuple(stop_ids(self.template, tokenizer)), self.template.stop_strings)
        self.max_positions = getattr(model.llm.config, "max_position_embeddings", None)

    @classmethod
    def load(
        cls, adapter: Path | str, *, model: Path | str | None = None, encoder: Path | str | None = None,
        store: Path | str | None = None, device: torch.device | str | None = None, dtype: str | None = None,
        quantization: str = "none", trust_remote_code: bool = False,
    ) -> "Pipeline":
        """Load an adapter directory, its backbone's LLM (`model`, else the registered path) and the encoder; the
        encoder and a feature `store` to read from are checked against the adapter before the LLM loads."""
        device = local_device(device)  # a device this machine lacks is refused before anything loads
        config, state = load_adapter(Path(adapter))
        spec = get_backbone(config.backbone)
        config.check_fits(backbone=spec.name, hidden_size=spec.hidden_size, vocab_size=spec.vocab_size, where=str(adapter))
        loaded = load_encoder(encoder) if encoder is not None else None
        if loaded is not None:
            _check_encoder(config, loaded, str(adapter))
        if store is not None:
            _check_store(config, FeatureStore.open(store), str(store))
        model = Path(model) if model else None
        tokenizer = backbone_tokenizer(spec, model)
        template = inference_template(config, spec, tokenizer, model, str(adapter))
        llm = load_frozen_llm(spec, model, dtype=dtype or ("fp32" if device.type == "cpu" else spec.dtype),
                              quantization=quantization, trust_remote_code=trust_remote_code, device=device)
        projector = build_projector(config.projector, config.in_features, config.out_features)
        try:
            projector.load_state_dict(state)
        except RuntimeError as exc:
            raise AdapterError(f"{adapter}: the weights do not match its {config.projector} projector config: {exc}") from None
        vision_llm = VisionLLM(llm, projector.to(device)).eval()
        if loaded is not None:
            loaded = loaded.to(device, default_compute_dtype(device))
        return cls(config, vision_llm, tokenizer, loaded, spec, device, template)

    def projector_digest(self) -> str:
        """A hash of the projector's weights: what tells one adapter's outputs from another's."""
        weights = hashlib.blake2b(digest_size=16)
        for name, tensor in sorted(self.model.projector.state_dict().items()):
            weights.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
        return weights.hexdigest()

    # -- features -----------------------------------------------------------------------------------------------------

    def image_features(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """[N, queries, width] features of images, through the frozen encoder (rounded to fp16, as stored)."""
        if self.encoder is None:
            raise AlignError("this pipeline has no encoder: load it with an encoder path (--encoder), or use stored features")
        pixels = np.stack([eval_view(read_image(image), self.encoder.preprocessing)[None] for image in images])
        return torch.from_numpy(encode(self.encoder, pixels, self.device, batch_size=len(images))[:, 0])

    def open_store(self, store: Path | str) -> FeatureStore:
        """A feature store whose rows this adapter was trained on (another encoder's is refused)."""
        opened = FeatureStore.open(store)
        _check_store(self.adapter, opened, str(store))
        return opened

    def stored_features(self, store: Path | str | FeatureStore, key: str) -> torch.Tensor:
        """[1, queries, width] features of one image from a feature store (by image key or by extracted path); an
        opened store is read as it is (open it once with `open_store` to read many)."""
        opened = store if isinstance(store, FeatureStore) else self.open_store(store)
        resolved = key if key in opened else opened.locate(Path(key).expanduser().resolve())
        return torch.from_numpy(np.asarray(opened.get(resolved)[0], dtype=np.float32))[None]

    # -- prompts and generation ---------------------------------------------------------------------------------------

    @property
    def system(self) -> str | None:
        """The system text prompts get unless told otherwise (None when the template has no system role)."""
        if not self.template.supports_system:
            return None
        return self.spec.system if self.spec.system is not None else self.template.default_system

    def prompt(self, turns: Sequence[Turn], with_image: bool, room: int = 0, system: str | None = None,
               drop_oldest: bool = True) -> Rendered:
        """The generation prompt for a conversation whose last question is unanswered; the image goes in the first
        kept question, and the oldest exchanges are dropped when the prompt plus `room` would not fit the LLM (or,
        without `drop_oldest`, the conversation is refused); a question alone gets what is left of the context for
        its reply, and is refused when nothing is. `system` replaces the backbone's system text."""
        turns = list(turns)
        while True:
            conversation = replace(conversation_from_turns(turns, with_image), system=system)
            rendered = render(self.template, conversation, self.tokenizer, system=self.spec.system,
                              num_query_tokens=self.adapter.num_query_tokens)
            if self.max_positions is None or len(rendered.input_ids) + room <= self.max_positions:
                return rendered
            if not drop_oldest:
                raise AlignError(f"the conversation takes {len(rendered.input_ids)} tokens; with {room} for the reply "
                                 f"that is past the model's context of {self.max_positions}")
            if len(turns) == 1:
                if len(rendered.input_ids) < self.max_positions:
                    return rendered
                raise AlignError(f"the question takes {len(rendered.input_ids)} tokens, leaving no room for a reply: "
                                 f"that is past the model's context of {self.max_positions}; ask a shorter one")
            turns = turns[1:]

    def generate_batch(self, prompts: list[Rendered], features: torch.Tensor, options: GenerationOptions,
                       on_text: Callable[[str], None] | None = None, cache: TurnCache | None = None) -> list[str]:
        """Replies to rendered prompts (left-padded into one batch); `features` fill their image slots in order. A
        reply never runs past the model's context."""
        return [reply.text for reply in self.replies(prompts, features, options, on_text, cache)]

    def replies(self, prompts: list[Rendered], features: torch.Tensor, options: GenerationOptions,
                on_text: Callable[[str], None] | None = None, cache: TurnCache | None = None,
                cancel: threading.Event | None = None) -> list[Reply]:
        """`generate_batch` with each reply's token count and why it ended; setting `cancel` ends it early."""
        if self.max_positions is not None:
            room = self.max_positions - max(len(p.input_ids) for p in prompts)
            if room < 1:
                raise AlignError(f"the prompt fills the model's context of {self.max_positions}: ask a shorter one")
            options = replace(options, max_new_tokens=min(options.max_new_tokens, room))
        return generate_replies(self.model, self.tokenizer, prompts, features, self.stops, options, on_text, cache,
                                cancel)

    def generate(self, image: ImageInput | None, question: str, options: GenerationOptions | None = None,
                 on_text: Callable[[str], None] | None = None) -> str:
        """One answer to one question about one image (or none)."""
        features = self.image_features([image]) if image is not None else torch.zeros(0)
        options = options or GenerationOptions()
        prompt = self.prompt([(question, None)], image is not None, options.max_new_tokens)
        return self.generate_batch([prompt], features, options, on_text)[0]


def _check_store(config: AdapterConfig, store: FeatureStore, where: str) -> None:
    """Refuse a feature store whose rows the adapter was not trained on."""
    theirs, ours = store.meta["encoder_fingerprint"], config.encoder_fingerprint
    if ours is not None and theirs != ours:
        raise AdapterError(f"store {where} holds features of encoder {theirs}; the adapter was trained on {ours}")
    if tuple(store.row_shape[1:]) != (config.num_query_tokens, config.in_features):
        raise AdapterError(f"store {where} rows are {list(store.row_shape[1:])}; the adapter takes "
                           f"[{config.num_query_tokens}, {config.in_features}]")


def _check_encoder(config: AdapterConfig, encoder: Encoder, where: str) -> None:
    """Refuse an encoder whose features the adapter was not trained on."""
    if encoder.row_shape != (config.num_query_tokens, config.in_features):
        raise AdapterError(f"encoder {encoder.source} makes [{encoder.row_shape[0]}, {encoder.row_shape[1]}] features; "
                           f"adapter {where} takes [{config.num_query_tokens}, {config.in_features}]")
    if config.encoder_fingerprint is not None and not encoder.made(config.encoder_fingerprint):
        raise AdapterError(f"adapter {where} was trained on features of encoder {config.encoder_fingerprint}, "
                           f"not of {encoder.source}")
