"""Feature extraction: images named by manifests → the frozen encoder, once per image → a feature store (resumable,
deduplicated by content, one store from all ranks).

May import: the shared tools modules (feature_store, manifest, images, rejects, runtime) and lower layers.
"""
