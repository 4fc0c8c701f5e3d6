"""Every fixed file and folder name align reads or writes, and the generation defaults, in one place (as PEFT's
utils/constants.py)."""

# Adapters (`adapters/adapter_files.py`): a directory with these two files.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_DIR = "adapter"  # a training stage's adapter, under its stage folder

# Exported encoders (`backbones/vision`).
ENCODER_CONFIG = "encoder_config.json"
ENCODER_WEIGHTS = "encoder.safetensors"

# Converted backbones (`align convert-backbone`): where the weights came from.
CONVERSION_NOTE = "align_conversion.json"

# Feature stores (`tools/feature_store.py`).
STORE_META = "meta.json"
STORE_SHARDS = "shards"

# Training runs (`tools/training`): per run, then per stage.
RECIPE_JSON = "recipe.json"
METRICS = "metrics.jsonl"
STAGE_DONE = "stage_done.json"
CHECKPOINTS = "checkpoints"
RENDER_CACHE_DIR = "render-cache"  # the run's render caches, unless runtime.render_cache names another folder
LATEST = "latest"

# Every job's skipped inputs, with reasons (`tools/rejects.py` names them).
REJECTS = "rejects.jsonl"

# Generation defaults shared by the CLI, captioning and the demo (plain values, so the CLI reads them without torch).
DEFAULT_QUESTION = "Describe this image."
DEFAULT_MAX_NEW_TOKENS = 256
