"""The frozen encoder: HF and LAVIS layouts load to the same features; export round-trips; preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from align.backbones.vision import EncoderError, export_encoder, load_encoder
from align.backbones.vision.preprocessing import Preprocessing, eval_view, views
from align.tools.images import BadImage, decode_image


def reference_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' own BLIP-2 path to the Q-Former output."""
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixels).qformer_outputs.last_hidden_state


def test_hf_layout_equals_transformers_blip2(tiny_blip2):
    model, hf_dir, _ = tiny_blip2
    encoder = load_encoder(hf_dir)
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(encoder.module(pixels), reference_features(model, pixels))
    assert not any(p.requires_grad for p in encoder.module.parameters())
    assert all(not name.startswith("language") for name in encoder.module.state_dict())


def test_lavis_layout_loads_to_the_same_features(tiny_blip2):
    _, hf_dir, lavis_dir = tiny_blip2
    hf, lavis = load_encoder(hf_dir), load_encoder(lavis_dir)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(hf.module(pixels), lavis.module(pixels))
    assert hf.weights_digest == lavis.weights_digest
    assert hf.fingerprint("fp32") == lavis.fingerprint("fp32") != hf.fingerprint("fp16")


def test_export_round_trips(tiny_blip2, tmp_path):
    _, hf_dir, _ = tiny_blip2
    exported = export_encoder(hf_dir, tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["encoder.safetensors", "encoder_config.json"]
    again = load_encoder(tmp_path / "enc")
    assert again.weights_digest == exported.weights_digest and again.row_shape == (4, 24)
    assert again.preprocessing == Preprocessing(image_size=28)


def test_an_export_over_an_encoder_is_whole_or_not_there_and_never_onto_its_source(tiny_blip2, tmp_path, monkeypatch):
    # A kill while exporting over an existing encoder left new weights beside the old config: every later use failed.
    from align.backbones.vision import blip2 as blip2_module
    from blip2_tiny import build_tiny_blip2, save_hf

    first = export_encoder(tiny_blip2[1], tmp_path / "enc")
    other = save_hf(build_tiny_blip2(seed=7), tmp_path / "other")

    def killed(encoder, out):  # the process dies after the weights, before the config
        blip2_module.save_file({"x": __import__("torch").zeros(1)}, str(out / "encoder.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(blip2_module, "_write_encoder", killed)
    with pytest.raises(KeyboardInterrupt):
        export_encoder(other, tmp_path / "enc")
    monkeypatch.undo()
    assert load_encoder(tmp_path / "enc").weights_digest == first.weights_digest  # the previous one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc", "other"]  # nothing half-written beside it
    second = export_encoder(other, tmp_path / "enc")
    assert load_encoder(tmp_path / "enc").weights_digest == second.weights_digest != first.weights_digest
    with pytest.raises(EncoderError, match="is the encoder being exported"):
        export_encoder(tmp_path / "enc", tmp_path / "enc")
    assert load_encoder(tmp_path / "enc").weights_digest == second.weights_digest


def test_tampered_export_is_refused(tiny_blip2, tmp_path):
    from safetensors.torch import load_file, save_file

    export_encoder(tiny_blip2[1], tmp_path / "enc")
    weights = load_file(tmp_path / "enc" / "encoder.safetensors")
    weights["query_tokens"] += 1
    save_file(weights, tmp_path / "enc" / "encoder.safetensors")
    with pytest.raises(EncoderError, match="does not match the digest"):
        load_encoder(tmp_path / "enc")


def test_not_an_encoder(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(tmp_path / "nope")
    with pytest.raises(EncoderError, match="is not an encoder"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(EncoderError, match="not blip-2"):
        load_encoder(tmp_path)


def test_pickle_checkpoints_are_never_executed(tiny_blip2, tmp_path):
    """A LAVIS file holding an arbitrary object is refused by weights_only loading."""
    import shutil

    lavis = tmp_path / "lavis"
    shutil.copytree(tiny_blip2[2], lavis)
    torch.save({"model": {"query_tokens": torch.zeros(1)}, "evil": Image.new("RGB", (1, 1))}, lavis / "eva_vit_g.pth")
    with pytest.raises(EncoderError, match="weights-only"):
        load_encoder(lavis)


def test_eval_view_is_blip2_eval_processor():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    pre = Preprocessing(image_size=28)
    view = eval_view(image, pre)
    expected = np.asarray(image.resize((28, 28), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = ((expected - np.array(pre.mean)) / np.array(pre.std)).transpose(2, 0, 1)
    assert view.shape == (3, 28, 28) and np.allclose(view, expected, atol=1e-6)


def test_training_views_are_random_crops_but_reproducible():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    pre = Preprocessing(image_size=28)
    first, again, other = views(image, pre, 3, seed=7), views(image, pre, 3, seed=7), views(image, pre, 3, seed=8)
    assert first.shape == (4, 3, 28, 28)
    assert np.array_equal(first, again) and not np.array_equal(first[1:], other[1:])
    assert np.array_equal(first[0], eval_view(image, pre))  # view 0 is the plain one
    assert not np.allclose(first[1], first[0])


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "RGBA", "LA"])
def test_non_rgb_modes_rejected_or_converted(mode):
    import io

    buffer = io.BytesIO()
    Image.new(mode, (8, 8)).save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    with pytest.raises(BadImage, match=f"colour mode {mode} is not RGB"):
        decode_image(buffer.getvalue())
    assert decode_image(buffer.getvalue(), convert_modes=True).mode == "RGB"


def test_alpha_is_composited_on_white():
    import io

    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), convert_modes=True).getpixel((0, 0)) == (255, 255, 255)
