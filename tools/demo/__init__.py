"""`align demo`: a tiny world, tiny models, and the real features → training → inference pipeline on them.

May import: the pipelines (features, training, inference) as a user runs them, the shared modules, lower layers.
"""
