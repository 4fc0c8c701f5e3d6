"""`align serve` started as a user starts it, on a free port, for tests that talk to it over HTTP."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from align.tools.runtime import child_environment


class LiveServer:
    """A running `align serve` process and its base URL; `stop` sends Ctrl-C and returns the exit code."""

    def __init__(self, args: list, home: Path, timeout: float = 180):
        env = child_environment() | {"ALIGN_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "align", "serve", "--port", "0", *map(str, args)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.printed = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"align serve ended: {self.process.wait()} {self.process.stderr.read()[-3000:]}")
            self.printed.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C stops"):
                break
        else:
            raise RuntimeError(f"align serve did not start in {timeout} s: {self.printed}")
        where = [line.split()[-1] for line in self.printed if line.startswith("web UI:")]
        api = [line.split()[1] for line in self.printed if line.startswith("API:")]
        self.url = where[0].rstrip("/") if where else api[0].removesuffix("/v1")
        self.api = f"{self.url}/v1"

    def rss_kib(self) -> int:
        """The server process's resident memory."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a user stops it: (exit code, what it wrote to stdout and stderr after starting)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            out, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        return self.process.returncode, out + err
