"""Backbones: specs (presets + user registry), native tokenizers, LLM loading."""
