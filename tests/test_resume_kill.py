"""Kill-and-resume: a training run killed with SIGKILL at a random moment after its first save, then
resumed, ends with exactly the weights of an uninterrupted run (single process, and 2-process gloo DDP).

Unlike tests/test_training.py's exact-resume tests (which stop at a time limit, through the code's own
exit path), nothing here lets the process finish what it was doing: the kill can land in a training
step, in validation or in the middle of writing ``last/``. The kill point is a seeded random fraction
of the time the uninterrupted run takes from its first save to its last, so it varies with the
machine's speed but is reproducible in kind; it is printed on failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vqdiff.checkpoint import load_checkpoint

TINY_MODEL = json.dumps({"hidden": 16, "residual_hidden": 8, "embedding_dim": 8})
TINY_CODES = json.dumps({"num_codes": 16})
STEPS, EVAL_EVERY = 36, 3  # 12 saves: room for a kill between the first save and the end
SEED = int(os.environ.get("VQDIFF_KILL_SEED", "20251202"))  # another seed: another kill point
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, subject_dir):
    """A tiny dataset made by vqdiff-prepare from two real bundles (512 streamlines, 8 groups)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("PYT_R", "POPT_R"):
        (src / f"{name}.trk").symlink_to(subject_dir / f"{name}.trk")
    out = tmp_path_factory.mktemp("data") / "ds"
    proc = subprocess.run([sys.executable, "-m", "vqdiff.training.cli_prepare", str(src), str(out), "--seed", "3"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _command(dataset: Path, out: Path, ddp: bool, extra=()) -> list[str]:
    train = ["-m", "vqdiff.training.cli_train", str(dataset), str(out), "--model", TINY_MODEL, "--bottleneck",
             TINY_CODES, "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--threads", "1", "--no-progress",
             "--device", "cpu", "--seed", "0", *extra]
    if ddp:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                *train, "--batch-size", "2"]
    return [sys.executable, *train, "--batch-size", "4"]


class Run:
    """One training process (its own process group: a kill takes torchrun and its workers together)."""

    def __init__(self, dataset: Path, out: Path, *, ddp: bool, extra=()):
        self.out, self.log = out, out.with_suffix(".log")
        self.log_file = open(self.log, "ab")
        self.proc = subprocess.Popen(_command(dataset, out, ddp, extra), stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=ENV, start_new_session=True)

    def wait_first_save(self, timeout: float = 240.0) -> float:
        """Block until ``last/`` holds a resumable state (or the process ends); the time it appeared."""
        state = self.out / "last" / "train_state.pt"
        deadline = time.monotonic() + timeout
        while not state.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no save before the process ended ({self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.002)
        return time.monotonic()

    def wait_last_save(self, timeout: float = 240.0) -> float:
        """Block until ``last/`` holds the final step (or the process ends); the time it appeared."""
        deadline = time.monotonic() + timeout
        while _steps_done(self.out / "last") < STEPS:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no final save ({self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.002)
        return time.monotonic()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self.log_file.close()

    def tail(self, n: int = 3000) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


def _steps_done(path: Path) -> int:
    try:
        return json.loads((path / "config.json").read_text())["training"]["steps_done"]
    except (FileNotFoundError, json.JSONDecodeError):  # between the renames of a checkpoint swap
        return -1


def _straight(dataset: Path, out: Path, ddp: bool) -> tuple[Path, float]:
    """The uninterrupted run, and its time from the first save to the last."""
    run = Run(dataset, out, ddp=ddp)
    first = run.wait_first_save()
    window = run.wait_last_save() - first
    assert run.wait() == 0, run.tail()
    return out, window


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    return _straight(dataset, tmp_path_factory.mktemp("straight") / "run", False)


def _same_final_state(reference: Path, out: Path, where: str) -> None:
    assert _steps_done(out / "last") == STEPS, where
    a, b = _weights(reference / "last"), _weights(out / "last")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{where}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    sa = torch.load(reference / "last" / "train_state.pt", weights_only=True)
    sb = torch.load(out / "last" / "train_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == STEPS and sa["best"] == sb["best"], where
    assert all(torch.equal(x["torch_rng"], y["torch_rng"]) and x["sampler_rng"] == y["sampler_rng"]
               for x, y in zip(sa["ranks"], sb["ranks"], strict=True)), where


def _kill_and_resume(dataset: Path, tmp_path: Path, reference: Path, window: float, *, ddp: bool) -> None:
    rng = random.Random(SEED + ddp)
    fraction = rng.uniform(0.05, 0.8)
    for attempt in range(4):  # a loaded machine can finish sooner than the reference did: kill earlier
        out = tmp_path / f"killed{attempt}"
        run = Run(dataset, out, ddp=ddp)
        run.wait_first_save()
        delay = fraction * window / 2 ** attempt if attempt < 3 else 0.0
        time.sleep(delay)
        run.kill()
        rc = run.wait()
        if rc == -signal.SIGKILL and _steps_done(out / "last") < STEPS:
            break
        assert rc in (0, -signal.SIGKILL), run.tail()  # it was done before the kill: try again, earlier
    else:
        pytest.fail(f"the run always finished before the kill (window {window:.2f} s)")
    saved = _steps_done(out / "last")
    swap = saved < 0  # killed between the two renames of a save (see the test below)
    if swap:
        saved = _steps_done(out / ".last.old")
    where = (f"killed {delay:.3f} s after the first save (window {window:.2f} s), resumed from step {saved}"
             f"{' (an interrupted swap)' if swap else ''}")
    assert EVAL_EVERY <= saved < STEPS and saved % EVAL_EVERY == 0, where
    print(where)
    resumed = Run(dataset, out, ddp=ddp)
    assert resumed.wait() == 0, f"{where}\n{resumed.tail()}"
    assert "resumed from" in resumed.tail(20_000), where
    _same_final_state(reference, out, where)


def test_sigkill_then_resume_gives_the_uninterrupted_weights(dataset, tmp_path, straight):
    _kill_and_resume(dataset, tmp_path, *straight, ddp=False)


def test_sigkill_then_resume_gives_the_uninterrupted_weights_ddp_gloo(dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo); the kill takes the launcher and both ranks at once."""
    _kill_and_resume(dataset, tmp_path, *_straight(dataset, tmp_path / "straight", True), ddp=True)


def test_a_kill_between_the_two_renames_of_a_save_still_resumes(dataset, tmp_path, straight):
    """The one moment a kill leaves no ``last/``: the checkpoint swap has moved the old one aside
    (``.last.old``) and not yet moved the new one in. The resume puts the old one back and goes on."""
    out = tmp_path / "run"
    first = Run(dataset, out, ddp=False, extra=["--time-limit", "0"])  # stops (and saves) after one step
    assert first.wait() == 0, first.tail()
    assert _steps_done(out / "last") == 1
    os.replace(out / "last", out / ".last.old")  # the state right after replace_dir's first rename
    resumed = Run(dataset, out, ddp=False)
    assert resumed.wait() == 0, resumed.tail()
    log = resumed.tail(20_000)
    assert "was being replaced" in log and "resumed from" in log, log
    assert not (out / ".last.old").exists()
    _same_final_state(straight[0], out, "after an interrupted swap")
