"""The frozen LLM plus the trained projector: projected Q-Former features are written into the image slots."""

import torch
from torch import nn
from transformers import PreTrainedModel


class VisionLLM(nn.Module):
    """Embeds the template's ids with the LLM's own table, overwrites image slots with projected features."""

    def __init__(self, llm: PreTrainedModel, projector: nn.Module):
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.llm.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The projector's own parameters: the only ones with requires_grad."""
        return list(self.projector.parameters())

    def check_frozen(self) -> None:
        """Assert the trainable set is exactly the projector."""
        trainable = {id(p) for p in self.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in self.projector.parameters()}, "only the projector may be trained"

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """[B, T] ids, [B, T] slot mask, [N, Q, D] features in slot order → [B, T, H] input embeddings."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if features.numel():
            projected = self.projector(features.to(self.projector_dtype)).to(embeds.dtype)
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), projected.reshape(-1, projected.shape[-1]))
        return embeds

    @property
    def projector_dtype(self) -> torch.dtype:
        """The dtype the projector computes in."""
        return next(self.projector.parameters()).dtype

    def forward(self, input_ids, attention_mask, image_mask, features, labels=None):
        """The LLM's output (with loss when labels are given) on the embedded sequence."""
        embeds = self.embed(input_ids, image_mask, features)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
