"""The run record: what a run's ``result.json`` holds, as a typed model with a schema version.

Every ``result.json`` is written (``write_record``) and read (``read_record``) through ``RunRecord``:
the sweep (is this run finished? is its record stale?), the leaderboard, ``bench eval`` and
``bench predict``. A record that is not JSON, not an object, lacks a field or holds one of the
wrong type is one ``BenchError`` naming its file and the field.

Schema versions: records made before the field existed lack ``schema_version`` and read as 1.
A change that older readers would misread (a field renamed, a meaning changed) bumps
``SCHEMA_VERSION`` and converts older records on reading (``upgraded``); a record of a newer
version than this code knows is refused, by name.

- 1: the first typed records (spelled ``labelled``).
- 2: one spelling, ``labeled``: ``split.n_labeled``, ``split.labeled_sha256``,
  ``config.protocol.labeled``, ``pseudo_labels.labeled_pixels`` and override keys ``labeled.*``.

Fields that records made before the telemetry (or before a later feature) lack are optional here;
the sections a reader looks into (``split``, ``dataset``, ``metrics``) are models of their own that
keep any further keys as they are, so a record read and written again holds the same JSON.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from bench import BenchError
from bench.protocol import LEGACY_KEYS, legacy_key
from bench.results import stale_record, write_json_atomic

SCHEMA_VERSION = 2


# schema 1 -> 2 renamed these record fields ("labelled" -> "labeled"): (section, old name) -> new name
RENAMED_IN_V2 = {("split", "labelled_sha256"): "labeled_sha256", ("split", "n_labelled"): "n_labeled",
                 ("pseudo_labels", "labelled_pixels"): "labeled_pixels"}


def _renamed(section, old: str, new: str) -> None:
    if isinstance(section, dict) and old in section and new not in section:
        section[new] = section.pop(old)


def upgraded(data: dict) -> dict:
    """A record's JSON in the current schema (a copy; the current version is returned as it is)."""
    if not isinstance(data.get("schema_version", 1), int) or data.get("schema_version", 1) >= SCHEMA_VERSION:
        return data
    data = copy.deepcopy(data)
    for (section, old), new in RENAMED_IN_V2.items():
        _renamed(data.get(section), old, new)
    config = data.get("config")
    for old, new in LEGACY_KEYS.items():  # the protocol section, as protocol files are read
        _renamed(config.get("protocol") if isinstance(config, dict) else None, old, new)
    if isinstance(data.get("overrides"), dict):
        data["overrides"] = {".".join(legacy_key(tuple(k.split(".")))): v for k, v in data["overrides"].items()}
    data["schema_version"] = 2
    return data


class _Section(BaseModel):
    """A part of a record: the fields readers use, typed; other keys kept as they are."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class RecordSplit(_Section):
    labeled_sha256: str
    n_labeled: int
    n_train: int
    source: str
    file: Optional[str] = None  # the list of labeled ids, relative to the protocol's results folder
    split_file_sha256: Optional[str] = None  # the --split-file's own sha256, when one was given


class RecordDataset(_Section):
    name: Optional[str] = None
    root: Optional[str] = None
    eval_split: Optional[str] = None
    n_eval: Optional[int] = None
    eval_ids_sha256: Optional[str] = None
    num_classes: Optional[int] = None
    class_names: Optional[list[str]] = None


class RecordMetrics(_Section):
    """Percent. ``per_class_iou`` is None for a class absent from the evaluation masks."""

    miou: float
    pixel_acc: float
    mean_class_acc: float
    per_class_iou: dict[str, Optional[float]]
    matching: Literal["direct", "hungarian"] = "direct"
    n_images: Optional[int] = None
    cluster_to_class: Optional[list[int]] = None  # hungarian: the class each cluster is scored as
    num_clusters: Optional[int] = None


class RecordConfig(_Section):
    """The resolved config the config hash covers (``bench.results.identity``), kept verbatim."""

    method: dict[str, Any]
    protocol: dict[str, Any]
    seed: Optional[int] = None
    split_file_sha256: Optional[str] = None


class RunRecord(BaseModel):
    """One finished run (``bench/execution.py`` makes it after training and evaluation)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    schema_version: int = SCHEMA_VERSION
    # what was run
    method: str
    protocol: str
    seed: int
    supervision: list[str]  # kinds of bench/supervision.py the method declared
    output: Literal["classes", "clusters"] = "classes"
    eval_network: str = "model"
    method_revision: int = 0  # the method's code_revision when it ran (records before revisions: 0)
    config: RecordConfig
    config_hash: str
    overrides: dict[str, Any] = {}  # as given on the command line (and by a preset)
    split: RecordSplit
    dataset: RecordDataset = RecordDataset()
    # where and how
    git_commit: Optional[str] = None
    versions: dict[str, Optional[str]] = {}
    device: Optional[str] = None
    processes: Optional[int] = None
    loader_workers: Optional[dict[str, Any]] = None  # DataLoader workers asked, used, cores (bench.execution.loader_workers)
    resumed_from_step: Optional[int] = None
    finished_at: Optional[str] = None
    # time and memory
    train_time_s: float
    eval_time_s: Optional[float] = None
    train_images_per_s: float
    train_cpu_time_s: Optional[float] = None  # the training process's, all its threads
    train_worker_cpu_time_s: Optional[float] = None  # its loader workers' (None: not measurable, no /proc)
    train_images_by_view: Optional[dict[str, int]] = None
    train_images_per_s_by_view: Optional[dict[str, float]] = None
    load: Optional[dict[str, Any]] = None
    peak_memory_mb: dict[str, float] = {}
    # results
    metrics: RecordMetrics
    best_validation: Optional[dict[str, Any]] = None  # eval.report=best
    pseudo_labels: Optional[dict[str, Any]] = None  # bench.evaluation.score_pseudo_labels
    method_summary: dict[str, Any] = {}
    collapse: Optional[dict[str, Any]] = None  # bench.diagnostics.collapse_check
    # files beside the record (the samples file: relative to the protocol's results folder)
    per_image_file: Optional[str] = None
    metrics_file: Optional[str] = None
    predictions_file: Optional[str] = None
    samples_file: Optional[str] = None
    checkpoint: Optional[str] = None  # --keep-checkpoint: the final checkpoint's absolute path

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if not 1 <= value <= SCHEMA_VERSION:
            raise ValueError(f"schema version {value} is not one this bench reads (1 to {SCHEMA_VERSION}): "
                             "a newer bench wrote it")
        return value

    def stale(self) -> str | None:
        """Why the record no longer reflects its method's code, or None (``bench.results.stale_record``)."""
        return stale_record(self.method, self.config.method, self.method_revision)

    def to_json(self) -> dict:
        """The record as written: the fields it was given (an older record read back keeps its
        own fields in the current schema's names, nothing added), with the schema version."""
        return {"schema_version": self.schema_version, **self.model_dump(exclude_unset=True)}


def record_error(path: Path, exc: ValidationError) -> BenchError:
    """One line naming the file and the first bad field; all missing top-level fields at once."""
    errors = exc.errors()
    missing = [".".join(map(str, e["loc"])) for e in errors if e["type"] == "missing"]
    if missing:
        return BenchError(f"result record {path} lacks field(s) {', '.join(missing)}")
    err = errors[0]
    where = ".".join(map(str, err["loc"]))
    if err["type"] == "extra_forbidden":
        return BenchError(f"result record {path}: {where} is not a field of a run record "
                          f"(schema version {SCHEMA_VERSION})")
    return BenchError(f"result record {path}: field {where}: {err['msg'].removeprefix('Value error, ')} "
                      f"(got {err['input']!r:.60})")


def read_record(path: Path) -> RunRecord:
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise BenchError(f"result record {path} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise BenchError(f"result record {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BenchError(f"result record {path} holds a JSON {type(data).__name__}, not an object")
    version = data.get("schema_version", 1)
    if isinstance(version, int) and version > SCHEMA_VERSION:  # before its fields, which it may have renamed
        raise BenchError(f"result record {path}: field schema_version: schema version {version} is not one this "
                         f"bench reads (1 to {SCHEMA_VERSION}): a newer bench wrote it")
    try:
        return RunRecord.model_validate(upgraded(data))  # an older file read in today's names
    except ValidationError as exc:
        raise record_error(path, exc) from None


def write_record(path: Path, record: RunRecord) -> None:
    write_json_atomic(path, record.to_json())
