"""Helpers for tests and benchmarks: a real ``bentoml serve`` subprocess and a random-weight model.

>>> with ServeProcess(env={"VQDIFF_MODEL": "/tmp/model"}) as server:   # free port, waits for /readyz
...     httpx.post(server.url + "/encode", files={"file": open("IFOF_R.trk", "rb")})

The server runs in its own process group and is always terminated (SIGTERM, then SIGKILL): on SIGTERM
it drains (requests in flight finish) for at most ``VQDIFF_DRAIN_S`` seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_dev_model(path: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """A random-weight VQ-Diff checkpoint whose normalisation is fitted on ``data_dir/*.trk`` (real
    data) or, without it, on a synthetic 200 mm box. For development and tests only."""
    import numpy as np
    import torch

    from vqdiff.checkpoint import save_checkpoint
    from vqdiff.io import load_bundle
    from vqdiff.models import ModelConfig, StreamlineAutoencoder
    from vqdiff.normalise import Normalisation

    files = sorted(Path(data_dir).glob("*.trk")) if data_dir else []
    if files:
        points = np.concatenate([np.concatenate(load_bundle(f).streamlines) for f in files])
    else:
        points = np.array([[-100.0, -100.0, -100.0], [100.0, 100.0, 100.0]])
    torch.manual_seed(seed)
    model = StreamlineAutoencoder.from_config(ModelConfig.for_kind("vq_diff"))
    return save_checkpoint(path, model, Normalisation.fit(points), model_id="dev-random", overwrite=True)


class ServeProcess:
    """``bentoml serve vqdiff.service.app:VQDiff`` from the repository root on a free port."""

    def __init__(self, env: Mapping[str, str] | None = None, *, port: int | None = None,
                 log_path: str | os.PathLike | None = None, ready_timeout: float = 180.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> ServeProcess:
        cmd = [sys.executable, "-m", "bentoml", "serve", "vqdiff.service.app:VQDiff", "--host", "127.0.0.1",
               "--port", str(self.port)]
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        return "(no log)"

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM to the whole group; SIGKILL after ``timeout`` (default: the drain time + 5 s)."""
        if timeout is None:
            timeout = float(self.env.get("VQDIFF_DRAIN_S") or 25) + 5
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this process leads (start_new_session)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
