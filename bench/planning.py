"""Planning a sweep: overrides -> each run's resolved config -> its identity (config hash, folder).

Everything is resolved up front, so a bad name or field fails before any training."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from bench import BenchError, supervision
from bench.protocol import Override, Protocol, deep_merge, legacy_key, load_protocol, nested, parse_override
from bench.registry import get_method_class, list_methods
from bench.results import config_hash, identity, run_dir
from bench.splits import split_file_sha256


@dataclass
class RunPlan:
    method: str
    seed: int
    protocol: Protocol
    method_cfg: object
    resolved: dict
    config_hash: str
    dir: Path
    overrides: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} / {self.protocol.name} / seed {self.seed}"


def split_overrides(overrides: list[Override], methods: list[str]) -> tuple[dict, dict[str, dict]]:
    """Overrides -> (protocol overrides, per-method config overrides), each a dict key path -> value.

    ``method.x`` applies to every method in the sweep, ``<name>.x`` to that method only;
    anything else is a protocol field (``train.iterations``).
    """
    protocol, per_method = {}, {m: {} for m in methods}
    for keys, value in overrides:
        if keys[0] == "method":
            for m in methods:
                per_method[m][keys[1:]] = value
        elif keys[0] in list_methods():
            if keys[0] in per_method:
                per_method[keys[0]][keys[1:]] = value
        else:
            protocol[legacy_key(keys)] = value
    return protocol, per_method


def plan_sweep(methods: list[str], protocol_name: str, seeds: list[int], overrides: list[Override | str],
               results_dir: Path) -> list[RunPlan]:
    """Resolve every run's config up front, so a bad name or field fails before any training.
    ``overrides``: (key path, value) pairs; a ``key=value`` text is parsed as on the command line."""
    methods, seeds = list(dict.fromkeys(methods)), list(dict.fromkeys(seeds))  # drop repeats, keep order
    for m in methods:
        get_method_class(m)
    overrides = [parse_override(o) if isinstance(o, str) else o for o in overrides]
    proto_over, method_over = split_overrides(overrides, methods)
    protocol = load_protocol(protocol_name, proto_over)
    split_sha = split_file_sha256(protocol.labeled)
    unknown = sorted(set(protocol.methods) - set(list_methods()))
    if unknown:
        raise BenchError(f"protocol {protocol.name}: methods.{unknown[0]}: no such method; valid: {', '.join(list_methods())}")
    plans = []
    for m in methods:
        cls = get_method_class(m)
        supervision.check_needs(m, cls.needs)
        try:
            mcfg = cls.Config.model_validate(deep_merge(protocol.methods.get(m, {}), nested(method_over[m])))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, err["loc"]))  # empty for a check across fields, whose message names them
            msg = err["msg"].removeprefix("Value error, ")
            origin = f" (protocol {protocol.name} sets methods.{m})" if protocol.methods.get(m) else ""
            raise BenchError(f"method {m}: " + (f"config field {where}: " if where else "") + msg + origin) from None
        recorded = {**{".".join(k): v for k, v in proto_over.items()},
                    **{".".join((m, *k)): v for k, v in method_over[m].items()}}
        for seed in seeds:
            resolved = {"method": {"name": m, **mcfg.model_dump()}, "protocol": protocol.model_dump(), "seed": seed}
            if split_sha:  # the list's content, not only its path, decides which run this is
                resolved["split_file_sha256"] = split_sha
            chash = config_hash(identity(resolved))
            plans.append(RunPlan(m, seed, protocol, mcfg, resolved, chash,
                                 run_dir(results_dir, protocol.name, m, seed, chash), recorded))
    return plans
