"""Checkpoints: where a run's checkpoint lies, writing it atomically, reading it back checked, and
the random-number state that makes a resumed run continue exactly."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from bench import BenchError
from bench.planning import RunPlan
from bench.results import atomic_path


def checkpoint_path(plan: RunPlan, cache_dir: Path) -> Path:
    return (Path(cache_dir) / "checkpoints" / plan.protocol.name / plan.method
            / f"seed{plan.seed}-{plan.config_hash[:10]}.pt")


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temp file and a rename: never a half-written checkpoint. Saved through
    a Python file object, so a full disk is an OSError ("No space left on device") rather than
    torch's "unexpected pos"."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise BenchError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_KEYS = ("config_hash", "stage_index", "step", "done_stages", "method", "optimizer", "scaler", "rng",
                   "elapsed_s", "images_seen")


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own message advises weights_only=False: never for a file we cannot vouch for
        raise BenchError(f"checkpoint {path} is damaged or not a bench checkpoint; "
                         "delete it to start the run over") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else ["(not a mapping)"]
    if missing:
        raise BenchError(f"checkpoint {path} is not a bench checkpoint (lacks {', '.join(missing)}); "
                         "delete it to start the run over")
    return ckpt
