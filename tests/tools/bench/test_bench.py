"""`align bench features` writes its measurement as JSON (speed itself is never asserted)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_features_writes_a_result(tiny_blip2, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "align", "bench", "features", "--encoder", str(tiny_blip2[1]), "--images", "4",
         "--batch-size", "2", "--iterations", "1", "--workers", "0", "--out-dir", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "decoding 4 synthetic 640x480 JPEGs" in result.stdout and "encoding 1 batch of 2" in result.stdout
    [written] = list(tmp_path.glob("features-cpu-fp32-*.json"))
    data = json.loads(written.read_text())
    assert data["decode_images"] == 4 and data["decode_images_per_second"] > 0 and data["encode_images_per_second"] > 0
    assert data["device"].startswith("cpu") and data["versions"]["torch"]


@pytest.mark.slow
def test_bench_load_llm_measures_an_official_layout(tmp_path):
    from align.tools.bench.bench import QWEN_7B, write_random_qwen1

    tiny = QWEN_7B | {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64,
                      "vocab_size": 300, "kv_channels": 8}
    write_random_qwen1(tmp_path / "qwen", tiny, shards=3)
    result = subprocess.run(
        [sys.executable, "-m", "align", "bench", "load-llm", "--checkpoint", str(tmp_path / "qwen"),
         "--dtype", "fp32", "--out-dir", str(tmp_path / "results")], capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    [written] = list((tmp_path / "results").glob("load-llm-qwen-7b-fp32-none-*.json"))
    data = json.loads(written.read_text())
    assert data["class"] == "Qwen1ForCausalLM" and data["model_bytes"] > 1.8 * data["checkpoint_bytes"]  # bf16 → fp32
    assert data["peak_rss_bytes"] >= data["peak_anonymous_bytes"] > 0 and data["versions"]["transformers"]


def test_results_never_overwrite_each_other_and_record_the_load(tmp_path):
    from align.tools.results import write_result

    first = write_result({"bench": "x"}, tmp_path, "x")[1]
    second = write_result({"bench": "x"}, tmp_path, "x")[1]
    assert first != second and first.is_file() and second.is_file()
    data = json.loads(second.read_text())
    assert len(data["load_average_1_5_15_min"]) == 3 and data["cpu_count"] >= 1 and data["versions"]["torch"]


@pytest.mark.slow
def test_bench_load_llm_checks_its_settings_before_writing_15_gb(tmp_path):
    target = tmp_path / "never-written"
    for bad in (["--dtype", "fp9"], ["--quantization", "3bit"]):
        result = subprocess.run([sys.executable, "-m", "align", "bench", "load-llm", "--checkpoint", str(target), *bad,
                                 "--out-dir", str(tmp_path)], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not target.exists()
