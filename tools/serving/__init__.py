"""Serving: `align serve`, one loaded pipeline in front of people (a gradio web UI) and programs (an
OpenAI-compatible HTTP API), with one request queue between them and the model.

May import: the shared tools modules (pipeline, generation, images, runtime) and lower layers.
"""
