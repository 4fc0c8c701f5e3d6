"""Inference: chat sessions and the REPL, batch captioning, through the shared `Pipeline` (reading stored features,
never extracting them).

May import: the shared tools modules (pipeline, generation, feature_store, manifest, images, rejects, runtime) and
lower layers.
"""
