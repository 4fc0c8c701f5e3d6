"""Training the projector: recipes, manifests rendered into samples and batches, the DeepSpeed trainer, data set
converters, and `align render`'s views of what the model is trained on.

May import: the shared tools modules (feature_store, manifest, rejects, runtime) and lower layers.
"""
