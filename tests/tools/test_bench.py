"""`align bench features` writes its measurement as JSON (speed itself is never asserted)."""

import json
import subprocess
import sys


def test_bench_features_writes_a_result(tiny_blip2, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "align", "bench", "features", "--encoder", str(tiny_blip2[1]), "--images", "4",
         "--batch-size", "2", "--iterations", "1", "--workers", "0", "--out-dir", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    [written] = list(tmp_path.glob("features-cpu-fp32-*.json"))
    data = json.loads(written.read_text())
    assert data["decode_images"] == 4 and data["decode_images_per_second"] > 0 and data["encode_images_per_second"] > 0
    assert data["device"].startswith("cpu") and data["versions"]["torch"]
