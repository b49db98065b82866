"""Protocols: declarative YAML files in ``protocols/``, parsed with ``yaml.safe_load`` (nothing is
executed) and validated field by field. A file may ``extends: <other>`` to share a base (files
starting with ``_`` are bases, not protocols)."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from bench import BenchError
from bench.supervision import KINDS

PROTOCOLS_DIR = Path(__file__).resolve().parent.parent / "protocols"


class _Strict(BaseModel):
    # inf and nan are never meaningful settings (lr=.inf would train to NaN)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def plain_name(value: str) -> str:
    """A name that becomes one path component (a protocol's results folder, a split's list file):
    letters, digits and ``_ . + -``, not starting with a dot, so it cannot leave its folder."""
    if not _PLAIN_NAME.fullmatch(value) or len(value) > 128:
        raise ValueError(f"{value!r} is not a plain name (letters, digits, _ . + -; at most 128 characters; "
                         "no path separators or leading dot): it names a folder or file")
    return value


PlainName = Annotated[str, AfterValidator(plain_name)]


class SynthSpec(_Strict):
    seed: int = 0
    num_train: int = Field(400, gt=0)
    num_val: int = Field(100, gt=0)
    size: int = Field(96, ge=32)


class HFSpec(_Strict):
    """A Hugging Face ``datasets`` source: a hub name (or a ``save_to_disk`` folder via --data-root)."""

    path: Optional[str] = None
    config_name: Optional[str] = None
    image_column: str = "image"
    mask_column: str = "annotation"
    class_names: list[str] = []
    ignore_index: int = 255


class DatasetSpec(_Strict):
    # the reader (bench/data/readers.py)
    name: Literal["synth", "folder", "voc", "cityscapes", "cityscapes27", "cocostuff27", "camvid", "hf"]
    root: Optional[str] = None  # the dataset folder (or --data-root); synth: generated under the cache dir
    train_split: PlainName = "train"
    eval_split: PlainName = "val"
    synth: Optional[SynthSpec] = None
    hf: Optional[HFSpec] = None
    # shorter image side after loading (images bilinear, masks nearest), for every split, evaluation
    # included: a shrunken resolution is part of the protocol and of every record; None = as stored
    resize: Optional[int] = Field(None, ge=16)

    @model_validator(mode="after")
    def _check(self):
        if self.name == "synth" and self.synth is None:
            self.synth = SynthSpec()
        return self


class LabeledSpec(_Strict):
    """Which training ids carry pixel labels: a ratio, a count, or a user's split file."""

    ratio: Optional[float] = Field(None, gt=0, le=1)
    count: Optional[int] = Field(None, gt=0)
    # a list of labeled ids; a relative path is read from the project's protocols/ folder (where the
    # field's official lists are shipped), so a protocol names the same file on every machine
    split_file: Optional[str] = None
    # the sha256 of the split file's bytes, pinned by the protocol: a list that differs (edited,
    # truncated, another draw) stops the run instead of training on other labels than the protocol's
    split_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$")
    seed: int = 0  # the selection seed; fixed per protocol, so every run seed sees the same labeled ids
    # a split of the dataset the labeled ids are drawn from (VOC "classic": the 1,464 fine-annotated
    # train images, inside train_aug); None: the whole training split
    pool: Optional[PlainName] = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("ratio", "count", "split_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of ratio, count, split_file (got {given or 'none'})")
        if self.split_sha256 is not None and self.split_file is None:
            raise ValueError("split_sha256 pins a split_file, but none is given")
        return self

    def split_path(self) -> Path | None:
        """Where the split file is read from (None: a seeded draw)."""
        if self.split_file is None:
            return None
        path = Path(self.split_file)
        return path if path.is_absolute() else PROTOCOLS_DIR / path


class ModelSpec(_Strict):
    backbone: str = "resnet18"
    output_stride: Literal[8, 16, 32] = 16
    head_channels: int = Field(256, gt=0)
    pretrained: bool = False  # ask timm for pretrained weights (needs the network)
    weights: Optional[str] = None  # a local backbone state-dict file


class OptimizerSpec(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)


class TrainSpec(_Strict):
    crop: int = Field(gt=0)
    scale: tuple[float, float] = (0.5, 2.0)
    batch_size: int = Field(8, gt=0)  # labeled (or the only) view
    unlabeled_batch_size: int = Field(8, gt=0)
    iterations: int = Field(gt=0)
    optimizer: OptimizerSpec = OptimizerSpec()
    lr_power: float = 0.9
    # LR factor of every named non-backbone parameter group (a segmenter's head, a method's extra
    # heads), as UniMatch/U2PL train the randomly initialised decoder at 10x the pretrained backbone;
    # groups named "backbone" or "*_backbone", and a method's single unnamed group, keep the LR
    head_lr_mult: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    num_workers: int = Field(0, ge=0)
    amp: bool = True  # autocast on CUDA; ignored on CPU
    # bf16 autocast on the CPU too: about 1.4x faster where the CPU computes bf16 natively
    # (AVX512-BF16, AMX), slower where it does not; changes the numbers, so off unless asked
    cpu_amp: bool = False
    # under torchrun on GPUs: SyncBatchNorm (statistics of the global batch) instead of per-rank
    # statistics averaged at checkpoints. Unset: on for real data (as the field trains), off for synth
    sync_bn: Optional[bool] = None

    @model_validator(mode="after")
    def _scale_range(self):
        low, high = self.scale
        if not 0 < low <= high:
            raise ValueError(f"train.scale must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        return self


class EvalSpec(_Strict):
    mode: Literal["whole", "slide"] = "whole"
    crop: Optional[int] = None
    stride: Optional[int] = None
    batch_size: int = Field(8, gt=0)
    # validate every N steps of the last training stage (mIoU into metrics.jsonl); None: only at the end
    every: Optional[int] = Field(None, gt=0)
    # "final": the record's metrics are the final checkpoint's (always); "best" also records the best
    # validation mIoU over the periodic evaluations and the final one, as its own field (optimistic:
    # chosen on the evaluation split, as U2PL/CPS/UniMatch report)
    report: Literal["final", "best"] = "final"

    @model_validator(mode="after")
    def _slide(self):
        if self.mode == "slide" and (not self.crop or not self.stride):
            raise ValueError("eval.crop and eval.stride are required for sliding-window evaluation")
        if self.report == "best" and not self.every:
            raise ValueError("eval.report=best needs eval.every (how often to validate)")
        return self


# seconds of annotation per training image, one field per kind of supervision (bench/supervision.py)
AnnotationCost = create_model("AnnotationCost", __base__=_Strict,
                              **{name: (float, kind.cost_s) for name, kind in KINDS.items()})


class Protocol(_Strict):
    name: PlainName
    description: str = ""
    dataset: DatasetSpec
    labeled: LabeledSpec
    model: ModelSpec = ModelSpec()
    train: TrainSpec
    eval: EvalSpec = EvalSpec()
    annotation_cost_s: AnnotationCost = AnnotationCost()
    # method settings this protocol fixes (method name -> config fields), e.g. the contrast sizes that
    # make prcl fit synth's budget: applied before the command line's overrides, part of the protocol
    # (a row that keeps them differs in nothing), and decided by the method's own config section of
    # a run's identity, where they end up
    methods: dict[PlainName, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _sync_bn_default(self):
        # resolved here, so the record says what ran; synth's false is the field's old default,
        # which leaves the config hash (results.LATER_FIELDS)
        if self.train.sync_bn is None:
            self.train.sync_bn = self.dataset.name != "synth"
        return self


def list_protocols(directory: Path = PROTOCOLS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.yaml") if not p.name.startswith("_"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise BenchError(f"protocol file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BenchError(f"protocol file {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise BenchError(f"protocol file {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise BenchError(f"protocol file {path} must hold a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_path(name_or_path: str, directory: Path, relative_to: Path | None = None) -> Path:
    """A protocol name (a file in ``directory``) or a .yaml path; ``relative_to``: the folder a
    relative path is read from (an ``extends:`` is relative to the file that says it, not to the
    current directory)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        if not path.is_file():
            raise BenchError(f"protocol file {path} does not exist")
        return path
    path = Path(directory) / f"{name_or_path}.yaml"
    if not path.exists():
        raise BenchError(f"unknown protocol {name_or_path!r}; valid protocols: {', '.join(list_protocols(directory))}")
    return path


# the spelling protocol files and overrides used before ``labeled``: read as its new name
LEGACY_KEYS = {"labelled": "labeled"}


def legacy_key(keys: tuple[str, ...]) -> tuple[str, ...]:
    """An override's key path with an old spelling of its first key replaced."""
    return (LEGACY_KEYS.get(keys[0], keys[0]), *keys[1:]) if keys else keys


def _renamed_legacy_keys(data: dict, path: Path) -> dict:
    for old, new in LEGACY_KEYS.items():
        if old in data:
            if new in data:
                raise BenchError(f"protocol file {path}: fields {old} and {new} are one field (old and new "
                                 f"spelling); keep {new}")
            data[new] = data.pop(old)
    return data


def load_protocol_dict(name_or_path: str, directory: Path = PROTOCOLS_DIR, _seen=()) -> tuple[dict, Path]:
    path = _resolve_path(name_or_path, directory)
    if path.resolve() in _seen:
        raise BenchError(f"protocol file {path}: 'extends' loops back on itself")
    data = _renamed_legacy_keys(_read_yaml(path), path)
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise BenchError(f"protocol file {path}: field extends: must be a protocol name or a .yaml path")
        base, _ = _load_parent(parent, path, _seen + (path.resolve(),))
        data = deep_merge(base, data)
    return data, path


def _load_parent(parent: str, child: Path, seen: tuple) -> tuple[dict, Path]:
    if Path(parent).suffix in (".yaml", ".yml"):  # a path: from the extending file's folder
        path = _resolve_path(parent, child.parent, relative_to=child.parent)
        return load_protocol_dict(str(path.resolve()), child.parent, seen)
    return load_protocol_dict(parent, child.parent, seen)


def load_presets(directory: Path = PROTOCOLS_DIR) -> dict[str, dict]:
    path = Path(directory) / "_presets.yaml"
    return _read_yaml(path) if path.exists() else {}


# one override: the path of keys into the config, and the value (``(("train", "iterations"), 100)``)
Override = tuple[tuple[str, ...], Any]


def preset_overrides(name: str, protocol: str | None = None, directory: Path = PROTOCOLS_DIR) -> list[Override]:
    """A preset's overrides, with their values as the preset file holds them, then (given a
    ``protocol``) that protocol's own refinement of the preset, its ``presets: {name: {key: value}}``
    block (inherited through ``extends``): a dataset whose budget must differ from the preset's
    (CamVid's thin classes need more pixels than 120) says so in its protocol, and the record lists
    every override that ran, as for the preset's."""
    presets = load_presets(directory)
    if name not in presets:
        raise BenchError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(presets)) or 'none'}")
    pairs = [(tuple(key.split(".")), value) for key, value in presets[name]["overrides"].items()]
    if protocol is not None:
        data, path = load_protocol_dict(protocol, directory)
        refinement = _protocol_presets(data, str(path)).get(name, {})
        pairs += [(tuple(key.split(".")), value) for key, value in refinement.items()]
    return pairs


def _protocol_presets(data: dict, source: str) -> dict[str, dict[str, Any]]:
    """The ``presets`` block of a protocol's dict, checked: preset name -> {dotted key: value}."""
    block = data.get("presets", {})
    if not isinstance(block, dict) or not all(isinstance(v, dict) for v in block.values()):
        raise BenchError(f"protocol {source}: field presets: must map a preset name to {{dotted.key: value}}")
    for name, refinement in block.items():
        for key in refinement:
            if not isinstance(key, str) or not key or any(not part for part in key.split(".")) or key.startswith("presets"):
                raise BenchError(f"protocol {source}: field presets.{name}: key {key!r} must be a dotted config key")
    return block


def parse_override(text: str) -> Override:
    """``a.b.c=value`` -> (("a","b","c"), value parsed as YAML: numbers, bools, lists, strings). The
    command line's texts are parsed here, once; everything after carries the pairs."""
    if "=" not in text:
        raise BenchError(f"override {text!r} must look like key=value (e.g. train.iterations=100)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise BenchError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return tuple(key.split(".")), value


def set_path(data: dict, keys: tuple[str, ...], value) -> None:
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise BenchError(f"override {'.'.join(keys)}: {key} is not a section")
    node[keys[-1]] = value


def nested(overrides: dict[tuple[str, ...], Any]) -> dict:
    """Key paths and values as the nested dict a config validates."""
    out: dict = {}
    for keys, value in overrides.items():
        set_path(out, keys, value)
    return out


def validate_protocol(data: dict, source: str) -> Protocol:
    # a preset's refinements are instructions for ``preset_overrides``, not settings: what they set
    # reaches the config as overrides, recorded and hashed like the preset's own
    _protocol_presets(data, source)
    data = {k: v for k, v in data.items() if k != "presets"}
    try:
        return Protocol.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise BenchError(f"protocol {source}: field {where}: {err['msg']}{more}") from None


def load_protocol(name_or_path: str, overrides: dict[tuple[str, ...] | str, object] | None = None,
                  directory: Path = PROTOCOLS_DIR) -> Protocol:
    """The protocol file (its ``extends`` chain merged) with ``overrides`` (key path, or dotted key,
    -> value) set, validated."""
    data, path = load_protocol_dict(name_or_path, directory)
    for key, value in (overrides or {}).items():
        set_path(data, legacy_key(key if isinstance(key, tuple) else tuple(key.split("."))), value)
    return validate_protocol(data, str(path))
