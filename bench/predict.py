"""Looking at what a model does: a run's model restored from its kept checkpoint (``bench eval``,
``bench predict``), colour masks and overlays, and the small prediction samples every run saves
for the leaderboard's overlay figure.

Samples: the first ``N_SAMPLES`` evaluation ids of a protocol. Their images and true masks are
stored once per protocol and evaluation set (``<results>/<protocol>/samples/<eval ids sha>.npz``),
each run's predictions of them beside its record (``predictions.npz``); both as thumbnails of at
most ``THUMBNAIL`` pixels on the longer side, so a record stays a few kB.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bench import BenchError
from bench.record import RunRecord, read_record
from bench.results import RESULT_FILE, atomic_path

N_SAMPLES = 4
THUMBNAIL = 160


def palette(num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """[256, 3] uint8 colours for class indices (the PASCAL VOC bit-pattern palette; ignore white)."""
    out = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        out[i] = (r, g, b)
    out[ignore_index] = (255, 255, 255)
    return out


def colour_mask(mask: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    return palette(256, ignore_index)[np.asarray(mask, dtype=np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    """``image`` [H, W, 3] uint8 blended with the colour mask (ignored pixels left as they are)."""
    colours = colour_mask(mask, ignore_index).astype(np.float32)
    out = image.astype(np.float32)
    keep = (np.asarray(mask) == ignore_index)[..., None]
    return np.where(keep, out, (1 - alpha) * out + alpha * colours).round().astype(np.uint8)


def thumbnail(array: np.ndarray) -> np.ndarray:
    """Every f-th pixel, f the smallest integer bringing the longer side to at most ``THUMBNAIL``."""
    f = max(1, -(-max(array.shape[:2]) // THUMBNAIL))
    return np.ascontiguousarray(array[::f, ::f])


def samples_path(protocol_dir: Path, eval_ids_sha256: str) -> Path:
    return Path(protocol_dir) / "samples" / f"{eval_ids_sha256[:16]}.npz"


def _save_npz(path: Path, arrays: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def save_samples(path: Path, source, ids: list[str]) -> None:
    """Images and true masks of the sample ids (once per protocol and evaluation set)."""
    if path.exists():
        return
    arrays = {"ids": np.array(ids)}
    for i, image_id in enumerate(ids):
        arrays[f"image_{i}"] = thumbnail(source.load_image(image_id).permute(1, 2, 0).numpy())
        arrays[f"mask_{i}"] = thumbnail(source.load_mask(image_id).numpy().astype(np.uint8))
    _save_npz(path, arrays)


def save_predictions(path: Path, ids: list[str], masks: list[torch.Tensor]) -> None:
    arrays = {"ids": np.array(ids)}
    for i, mask in enumerate(masks):
        arrays[f"pred_{i}"] = thumbnail(mask.numpy().astype(np.uint8))
    _save_npz(path, arrays)


def load_npz(path: Path) -> dict | None:
    """The arrays of a samples or predictions file, None when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError):
        return None


def predict_sample_ids(method, source, ids: list[str], spec, device, amp: bool,
                       cluster_to_class: list[int] | None, cpu_amp: bool = False) -> list[torch.Tensor]:
    from bench.data.views import LabeledDataset
    from bench.evaluation import predict_classes

    dataset = LabeledDataset(source, ids, augment=None)
    return [predict_classes(method, dataset[(i, 0)]["image"][None], spec, device, amp, cluster_to_class,
                            source.ignore_index, cpu_amp)[0] for i in range(len(ids))]


# ---------------------------------------------------------------- a run restored from its checkpoint


def checkpoint_path(record: RunRecord, cache_dir: Path) -> Path:
    """Where ``bench run --keep-checkpoint`` left the run's final checkpoint."""
    if record.checkpoint:
        return Path(record.checkpoint)
    return (Path(cache_dir) / "checkpoints" / record.protocol / record.method
            / f"seed{record.seed}-{record.config_hash[:10]}.pt")


def load_run(run_dir: Path, cache_dir: Path, device_name: str = "auto"):
    """(record, protocol, source, method on its device) of a finished run with a kept checkpoint."""
    from bench.device import resolve_device
    from bench.checkpoint import load_checkpoint
    from bench.method import RunContext
    from bench.protocol import validate_protocol
    from bench.registry import get_method_class
    from bench.execution import prepare_source

    record = read_record(Path(run_dir) / RESULT_FILE)
    ckpt_file = checkpoint_path(record, cache_dir)
    ckpt = load_checkpoint(ckpt_file)
    if ckpt is None:
        raise BenchError(f"{run_dir}: no checkpoint at {ckpt_file}; re-run it with `bench run ... --keep-checkpoint` "
                         "(the record is kept: delete its folder first) or pass --cache-dir")
    if ckpt.get("config_hash") != record.config_hash:
        raise BenchError(f"checkpoint {ckpt_file} belongs to another config than {run_dir}")
    protocol = validate_protocol(record.config.protocol, f"(from {run_dir / RESULT_FILE})")
    cls = get_method_class(record.method)
    method_cfg = cls.Config.model_validate({k: v for k, v in record.config.method.items() if k != "name"})
    device = resolve_device(device_name)
    source = prepare_source(protocol, cache_dir, progress=False)
    ctx = RunContext(source.num_classes, source.class_names, source.ignore_index, device, protocol.model,
                     protocol.train.iterations, record.seed, protocol.train.optimizer.lr,
                     tuple(protocol.train.scale), protocol.train.batch_size)
    torch.manual_seed(record.seed)
    method = cls(method_cfg, ctx).to(device)
    method.load_state_dict(ckpt["method"])
    return record, protocol, source, method, device


def eval_run(run_dir: Path, cache_dir: Path, split: str | None = None, device_name: str = "auto",
             progress: bool = True) -> tuple[dict, dict]:
    """Evaluate a kept checkpoint on ``split`` (default: the record's evaluation split); returns the
    record and the new metrics."""
    from bench.evaluation import evaluate

    record, protocol, source, method, device = load_run(run_dir, cache_dir, device_name)
    ids = source.split_ids(split or protocol.dataset.eval_split)
    metrics, _ = evaluate(method, source, ids, protocol.eval, device, protocol.train.amp, progress,
                          protocol.train.cpu_amp)
    return record, metrics


def _read_image(path: Path, resize: int | None) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise BenchError(f"image {path} cannot be read: {exc}") from None
    if resize:
        w, h = image.size
        scale = resize / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def predict_files(run_dir: Path, images: list[Path], out_dir: Path, cache_dir: Path,
                  device_name: str = "auto") -> list[Path]:
    """For each image: ``<stem>_mask.png`` (class indices, palette PNG), ``<stem>_colour.png`` and
    ``<stem>_overlay.png``, at the image's resolution (after the protocol's ``dataset.resize``)."""
    from PIL import Image

    from bench.data.views import normalize
    from bench.evaluation import predict_classes

    record, protocol, source, method, device = load_run(run_dir, cache_dir, device_name)
    metrics = record.metrics
    cluster_map = metrics.cluster_to_class if metrics.matching == "hungarian" else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    pal = palette(256, source.ignore_index)
    for path in images:
        image = _read_image(Path(path), protocol.dataset.resize)
        mask = predict_classes(method, normalize(image)[None], protocol.eval, device, protocol.train.amp,
                               cluster_map, source.ignore_index, protocol.train.cpu_amp)[0].numpy().astype(np.uint8)
        stem = Path(path).stem
        indexed = Image.fromarray(mask, mode="P")
        indexed.putpalette(pal.reshape(-1).tolist())
        for name, picture in ((f"{stem}_mask.png", indexed),
                              (f"{stem}_colour.png", Image.fromarray(colour_mask(mask, source.ignore_index))),
                              (f"{stem}_overlay.png", Image.fromarray(
                                  overlay(image.permute(1, 2, 0).numpy(), mask, ignore_index=source.ignore_index)))):
            picture.save(out_dir / name)
            written.append(out_dir / name)
    legend = {str(i): name for i, name in enumerate(source.class_names)}
    (out_dir / "classes.json").write_text(json.dumps({"classes": legend, "ignore": source.ignore_index,
                                                      "run": str(run_dir)}, indent=2) + "\n")
    return written
