"""Where a run's step records go: metrics.jsonl always (the one record of a run, each step once), and TensorBoard
event files too when `runtime.report_to` names it."""

import importlib.util
import json
from pathlib import Path

from align.constants import METRICS
from align.errors import AlignError
from align.files import open_own

TENSORBOARD_DIR = "tensorboard"
# The record's numbers drawn as TensorBoard scalars, under "<stage>/<name>".
SCALARS = ("loss", "lr", "grad_norm", "samples_per_second", "tokens_per_second", "padding_efficiency")


def check_reporters(report_to: list[str]) -> None:
    """Refuse, before anything loads, a reporter whose package is missing."""
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:  # torch's writer needs it
        raise AlignError("runtime.report_to names tensorboard, which is not installed: "
                         "pip install tensorboard (or align-vlm[tensorboard])")


class MetricsLog:
    """Appends step records to metrics.jsonl (flushed per step) and, if asked, to TensorBoard."""

    def __init__(self, output_dir: Path, report_to: list[str]):
        self._file = open_own(Path(output_dir) / METRICS)
        self._board = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(Path(output_dir) / TENSORBOARD_DIR))

    def write(self, record: dict) -> None:
        """One step's record."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._board is not None:
            stage, step = record["stage"], record["step"]
            for name in SCALARS:
                if isinstance(record.get(name), (int, float)):
                    self._board.add_scalar(f"{stage}/{name}", record[name], step)
            for name, value in (record.get("eval") or {}).items():
                self._board.add_scalar(f"{stage}/eval/{name}", value, step)

    def close(self) -> None:
        """Flush and close both."""
        self._file.close()
        if self._board is not None:
            self._board.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
