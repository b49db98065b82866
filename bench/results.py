"""Result records: one ``result.json`` per run (its content: ``bench/record.py``), written atomically;
failures go to ``failure.json``; the config hash that names a run."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

from bench import BenchError
from bench.protocol import LEGACY_KEYS
from bench.supervision import KINDS

RESULT_FILE, FAILURE_FILE, PER_IMAGE_FILE = "result.json", "failure.json", "per_image.npz"
PREDICTIONS_FILE = "predictions.npz"  # a run's predictions of the protocol's sample images (the overlay figure)


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_hash(resolved: dict) -> str:
    protocol = resolved.get("protocol")
    if isinstance(protocol, dict):
        # hashed under the spelling of the records made before the rename, so they keep their hashes
        old_name = {new: old for old, new in LEGACY_KEYS.items()}
        resolved = {**resolved, "protocol": {old_name.get(k, k): v for k, v in protocol.items()}}
    return hashlib.sha256(canonical_json(resolved).encode()).hexdigest()


# fields that cannot change a run's numbers: recorded, but they do not make a run different
OPERATIONAL_FIELDS = (("protocol", "description"), ("protocol", "train", "checkpoint_every"),
                      ("protocol", "train", "num_workers"))
# the protocol's method settings reach the identity through the method's own config section
# (``resolved["method"]``); counted there only, a protocol that adds them keeps its records' hashes
IN_METHOD_CONFIG = (("protocol", "methods"),)
# fields added to protocols after records existed, with the default that reproduces the old
# behaviour: left out of the identity while they hold it, so older records keep their hashes
LATER_FIELDS = {("protocol", "dataset", "resize"): None, ("protocol", "dataset", "hf"): None,
                ("protocol", "labeled", "pool"): None, ("protocol", "train", "sync_bn"): False,
                ("protocol", "labeled", "split_sha256"): None, ("protocol", "train", "head_lr_mult"): 1.0,
                ("protocol", "eval", "every"): None, ("protocol", "eval", "report"): "final",
                ("protocol", "train", "cpu_amp"): False,
                # the annotation cost of a kind of supervision added after records existed
                **{("protocol", "annotation_cost_s", name): kind.cost_s for name, kind in KINDS.items()
                   if not kind.hashed_at_default}}


# fields added to a method's config after records existed, with their defaults: left out of the
# identity while they hold them, so older records keep their hashes. The issue-14 switches default
# to the reference's behaviour, which is not what those older records ran: the README lists the
# records this made stale (same hash, to be re-run), and the leaderboard names any other setting.
LATER_METHOD_FIELDS = {
    "prcl": {"classmix_count": "floor_unique", "kernels": "eager"},
    "picie": {"crop_range_of": "side", "fpn_smoothing": False, "kmeans_metric": "euclidean",
              "cluster_weights": "frequency", "jitter_draw": "per_operation", "kmeans_backend": "torch"},
    "pixcontrast": {"memory_loss_weight": 1.0, "memory_temperature": 0.07, "memory_max_views": 1,
                    "memory_init": "random", "memory_skip_class_0": True},
}


def identity(resolved: dict, with_seed: bool = True) -> dict:
    """The part of a resolved config that decides the result: what the config hash covers, and,
    without the seed, what makes runs comparable (poolable over seeds) on the leaderboard."""
    out = copy.deepcopy(resolved)
    for path in OPERATIONAL_FIELDS + IN_METHOD_CONFIG + (() if with_seed else (("seed",),)):
        node = out
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    for path, default in LATER_FIELDS.items():
        node = out
        for key in path[:-1]:
            node = node.get(key, {})
        if path[-1] in node and node[path[-1]] == default:
            del node[path[-1]]
    method = out.get("method", {})
    for field, default in LATER_METHOD_FIELDS.get(method.get("name"), {}).items():
        if field in method and method[field] == default:
            del method[field]
    return out


def stale_record(method: str, method_config: dict, made: int) -> str | None:
    """Why a finished record of ``method`` with ``method_config`` (its recorded fields, ``name``
    included or not), made at code revision ``made``, no longer reflects the method's code (made
    at an older ``code_revision``), or None. Unknown methods and configs that no longer validate
    are not judged."""
    from pydantic import ValidationError

    from bench.registry import get_method_class  # here: the registry imports every method (torch)

    try:
        cls = get_method_class(method)
        fields = {k: v for k, v in method_config.items() if k != "name"}
        current = cls.revision(cls.Config.model_validate(fields))
    except (BenchError, ValidationError):
        return None
    if made >= current:
        return None
    return f"was made by revision {made} of {method}'s code, which is now at revision {current}"


def run_dir(results_dir: Path, protocol: str, method: str, seed: int, chash: str) -> Path:
    return Path(results_dir) / protocol / method / f"seed{seed}-{chash[:10]}"


def tmp_owner() -> str:
    """Who writes a temp file: host and pid, in its name, so that a later process can tell an
    orphan (its writer was killed) from a file another live process is still writing."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


@contextmanager
def atomic_path(path: Path):
    """Yield a temp path beside ``path``; on success rename it into place, on failure remove it.

    Readers never see a partial file, and a failed write never replaces a good one. A writer
    killed outright (SIGKILL, power loss) leaves its temp file: ``remove_orphaned_tmp`` removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{tmp_owner()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; records are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_orphaned_tmp(directory: Path) -> list[Path]:
    """Remove the temp files in ``directory`` whose writer, a process on this host, no longer
    exists (a killed run's half-written checkpoint or record). Files of live processes, of other
    hosts (a shared file system) and names this module did not make are left alone."""
    host, removed = socket.gethostname().replace(".", "_"), []
    if not Path(directory).is_dir():
        return removed
    for tmp in Path(directory).glob("*.tmp"):
        owner = tmp.name.removesuffix(".tmp").split(".")
        if len(owner) < 3 or "-" not in owner[-2]:
            continue
        owner_host, _, pid = owner[-2].rpartition("-")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()  # a folder: the synth generator's
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def run_lock(directory: Path):
    """An exclusive, non-blocking lock on a run folder (``.lock``): yields True when this process
    holds it, False when another process is working on the run. Released when the process ends,
    however it ends, so a killed worker never leaves a run locked."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one process per results dir is then the user's job
        yield True
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_writable(directory: Path) -> None:
    """Fail before any training if records could not be written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BenchError(f"results dir {directory} is not writable: {exc.strerror or exc}") from None


def git_commit() -> str | None:
    """The commit of the bench checkout this code runs from, '+dirty' when it has local changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("bench", "torch", "torchvision", "timm", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def save_per_image(path: Path, confusion) -> None:
    """Per-image confusion matrices [N, C, K] (compressed npz), for bootstrap comparisons."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, confusion=np.asarray(confusion, dtype=np.int32))


def load_per_image(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["confusion"]
    except (OSError, KeyError, ValueError) as exc:
        raise BenchError(f"per-image file {path} cannot be read: {exc}") from None
