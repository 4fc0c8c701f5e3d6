"""align: give a causal LLM eyes by training one projector on cached BLIP-2 Q-Former features."""

__version__ = "0.1.0"
