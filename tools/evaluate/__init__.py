"""Evaluation: benchmarks read in their published formats, answers generated through the shared `Pipeline` (or read
from another model's predictions file), and scores computed as the official tools compute them.

May import: the shared tools modules (pipeline, generation, feature_store, manifest, images, rejects, runtime) and
lower layers.
"""
