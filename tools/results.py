"""Measured results, written as JSON under bench/results/ with what the figures depend on (versions, the machine
and its load, the time): what `align bench` and `align demo --results` write (shared by those rooms)."""

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from align import __version__

RESULTS_DIR = Path("bench") / "results"


def device_name(device: torch.device) -> str:
    """A human name for the device measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_result(result: dict, out_dir: Path, name: str) -> tuple[dict, Path]:
    """Add what the figures depend on (versions, time, the machine's load while measuring) and write the result
    under a name no other run takes: the time to the second, and a counter if that is taken too."""
    result = {
        **result,
        "versions": {"align": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda},
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["measured_at"][:19].replace(":", "")
    path, n = out_dir / f"{name}-{stamp}.json", 1
    while path.exists():
        n += 1
        path = out_dir / f"{name}-{stamp}-{n}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result, path
