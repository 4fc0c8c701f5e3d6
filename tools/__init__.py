"""Pipelines behind the `align` command: render views, feature extraction, data, recipes, training, chat."""
