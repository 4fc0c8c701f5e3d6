"""Projector modules, the frozen-LLM + projector model, adapter save/load and checkpoint import."""
