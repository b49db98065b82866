"""Training telemetry: ``metrics.jsonl`` beside a run's record (and optionally TensorBoard).

One JSON line per logging window (every ``LOG_EVERY`` steps and at the end of each stage): the
stage, step, global iteration, learning rate, the window's mean of every part a method's
``training_step`` returns, images/s per view and the 1-minute load average; plus one line per
periodic validation (``eval.every``). A resumed run truncates the file to the byte offset its
checkpoint recorded, so the file continues without duplicates.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOG_EVERY = 10  # steps per logged window (also the progress bar's refresh)


def children_cpu_seconds() -> dict[int, float] | None:
    """CPU seconds (user + system) of this process's live child processes (its DataLoader workers
    among them), by pid, from ``/proc``; None where there is no ``/proc`` (macOS, Windows)."""
    if not os.path.isdir("/proc"):
        return None
    me, tick, out = os.getpid(), os.sysconf("SC_CLK_TCK"), {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        # after "pid (comm) ": state, ppid, ... utime and stime are the 14th and 15th fields of the line
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == me:
            out[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def load_average() -> float | None:
    """The machine's 1-minute load average, None where the OS has none (Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class RunLog:
    """Appends telemetry lines to ``path``; mirrors scalars to TensorBoard when asked."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        self.tensorboard_dir = tensorboard_dir
        self.writer = None

    def start(self, offset: int, iteration: int) -> None:
        """Keep the first ``offset`` bytes (what the checkpoint saw; 0 for a fresh run)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.truncate(min(offset, f.seek(0, os.SEEK_END)))
        if self.tensorboard_dir is not None and self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("bench: --tensorboard needs the tensorboard package (pip install tensorboard); "
                      f"logging to {self.path} only")
                self.tensorboard_dir = None
                return
            # purge_step: a resumed run drops the events the interrupted one wrote after its checkpoint
            self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=iteration or None)

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def write(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        if self.writer is not None:
            it = entry["iteration"]
            for key, value in _scalars(entry).items():
                self.writer.add_scalar(key, value, it)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _scalars(entry: dict) -> dict[str, float]:
    if entry["kind"] == "val":
        return {"val/miou": entry["miou"], "val/pixel_acc": entry["pixel_acc"]}
    out = {f"train/{k}": v for k, v in entry["parts"].items()}
    out["train/lr"] = entry["lr"]
    out.update({f"throughput/{k}_images_per_s": v for k, v in entry["images_per_s"].items()})
    return out


def read_metrics(path: Path) -> list[dict]:
    """The lines of a ``metrics.jsonl`` (an unreadable line ends the reading: a run killed mid-write)."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
