"""A new projector is matched to the frozen LLM's input embeddings: its outputs on the store's features start with
the embeddings' per-dimension mean and spread, whatever the projector kind."""

import pytest
import torch

from align.adapters.projector import build_projector, embedding_statistics, match_embeddings


def test_embedding_statistics_read_in_chunks_equal_the_whole_table():
    torch.manual_seed(0)
    table = torch.randn(1000, 24, dtype=torch.bfloat16) * 0.05 + 0.3
    mean, spread = embedding_statistics(table, chunk=64)
    whole = table.float()
    assert torch.allclose(mean, whole.mean(0), atol=1e-6)
    assert spread == pytest.approx(float((whole - whole.mean(0)).square().mean().sqrt()), rel=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_a_matched_projector_speaks_at_the_scale_of_the_words(kind):
    torch.manual_seed(0)
    features = torch.randn(512, 32) * 3 + 1  # Q-Former outputs are far larger than word embeddings
    table = torch.randn(5000, 48) * 0.02 + torch.linspace(-0.05, 0.05, 48)
    mean, spread = embedding_statistics(table)
    projector = build_projector(kind, 32, 48)
    before = projector(features).detach()
    assert float((before - before.mean(0)).std()) > 10 * spread
    match_embeddings(projector, features, mean, spread)
    out = projector(features).detach()
    assert torch.allclose(out.mean(0), mean, atol=1e-5)
    assert float((out - out.mean(0)).square().mean().sqrt()) == pytest.approx(spread, rel=1e-4)
    # Only the scale and offset moved: the outputs are the old ones, centred and shrunk.
    centred = before - before.mean(0)
    assert torch.allclose(out - out.mean(0), centred * (spread / float(centred.square().mean().sqrt())), atol=1e-5)
