"""Pipelines (layer 4): one room per pipeline, beside a few shared modules.

Rooms: `features/` (frozen encoder → feature store), `training/` (recipes, data, the projector trainer, data
converters, render views), `inference/` (chat, captioning), `evaluate/` (benchmarks and their official metrics),
`serving/` (the web UI and the OpenAI-compatible API), `transfer/` (an adapter carried to another LLM); `demo/` and
`bench/` run those as a user would. Shared modules: `feature_store` (written by features, read by the others),
`manifest` (JSON Lines records), `images` (reading images with bad-input checks), `rejects` (what a job skipped),
`runtime` (ranks, device, process group, progress display), `results` (measured results as JSON), `pipeline` and
`generation` (what inference, evaluation and serving generate through). A pipeline imports the shared modules and
lower layers, never another pipeline (tests/test_layers.py checks it).
"""
