"""Method registry, in the spirit of timm's ``register_model`` / ``list_models``.

A method file in ``methods/`` decorates its class with ``@register_method``; importing the
``methods`` package imports every module in it, so dropping a new file there is all it takes.

Methods from other installed packages: a package that declares an entry point in the
``bench.methods`` group (``[project.entry-points."bench.methods"] mine = "my_pkg.mine"``) has its
module (or ``module:Class``) loaded here after ``methods/``; the module registers its classes with
``@register_method`` as a file in ``methods/`` does, and an entry point naming a ``Method``
subclass registers that class.
"""
from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from importlib import metadata

from bench import BenchError

ENTRY_POINT_GROUP = "bench.methods"

_METHODS: dict[str, type] = {}
_DISCOVERED = False


def register_method(cls):
    name = cls.name
    if name in _METHODS and _METHODS[name] is not cls:
        raise BenchError(f"method name {name!r} registered twice ({_METHODS[name].__module__}, {cls.__module__})")
    _METHODS[name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import methods

    for info in pkgutil.iter_modules(methods.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"methods.{info.name}")
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load_entry_point(entry)  # a broken one fails every lookup, not only the first
    _DISCOVERED = True


def _load_entry_point(entry) -> None:
    from bench.method import Method

    where = f"entry point {entry.name!r} ({entry.value}) of group {ENTRY_POINT_GROUP}"
    if entry.dist is not None:
        where += f" in package {entry.dist.name}"
    try:
        loaded = entry.load()
    except BenchError as exc:  # register_method refusing a name already taken
        raise BenchError(f"{where}: {exc}") from None
    except Exception as exc:
        raise BenchError(f"{where} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, type) and issubclass(loaded, Method):
        try:
            register_method(loaded)
        except BenchError as exc:
            raise BenchError(f"{where}: {exc}") from None


def list_methods(pattern: str = "*") -> list[str]:
    _discover()
    return sorted(n for n in _METHODS if fnmatch.fnmatch(n, pattern))


def get_method_class(name: str) -> type:
    _discover()
    if name not in _METHODS:
        raise BenchError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}")
    return _METHODS[name]
