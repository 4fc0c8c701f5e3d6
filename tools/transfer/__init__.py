"""Transfer: `align transfer`, a trained adapter carried to another LLM as a warm start (the converter and its
composition with the projector live in `adapters/transfer.py`).

May import: the shared tools modules (manifest, rejects) and lower layers.
"""
