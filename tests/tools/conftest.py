"""Fixtures of the pipelines' tests: a random adapter over the shared training workspace."""

import pytest
import torch

from align.adapters.adapter_files import AdapterConfig, save_adapter
from align.adapters.projector import build_projector
from align.tools.feature_store import FeatureStore


@pytest.fixture(scope="module")
def adapter(train_workspace, tmp_path_factory):
    """A random linear projector bound to tiny-llama and to the workspace's encoder."""
    store = FeatureStore.open(train_workspace["features"])
    torch.manual_seed(1)
    projector = build_projector("linear", 24, 32)
    config = AdapterConfig(projector="linear", in_features=24, out_features=32, backbone="tiny-llama", hidden_size=32,
                           vocab_size=640, template="vicuna-v1.1", num_query_tokens=4,
                           encoder_fingerprint=store.meta["encoder_fingerprint"], stage="chat", step=1)
    return save_adapter(tmp_path_factory.mktemp("adapter") / "adapter", config, projector.state_dict())
