"""Training the projector: recipes (`recipe`, `validate`), records rendered once into memory maps (`render_cache`,
`training_data`), which samples form each batch (`data_order`), pickle-free training state (`train_state`), the
DeepSpeed trainer, data set converters, and `align render`'s views of what the model is trained on.

May import: the shared tools modules (feature_store, manifest, rejects, runtime) and lower layers.
"""
