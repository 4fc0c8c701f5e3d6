"""Inference: generation through the projector, the Python `Pipeline`, chat sessions and the REPL, batch
captioning (reading stored features, never extracting them).

May import: the shared tools modules (feature_store, manifest, images, rejects, runtime) and lower layers.
"""
