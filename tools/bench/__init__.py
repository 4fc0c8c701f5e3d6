"""`align bench`: measured speed and memory, written as JSON under bench/results/.

May import: the pipelines (features, training, inference) it measures, the shared modules, lower layers.
"""
