"""Method registry, in the spirit of timm's ``register_model`` / ``list_models``.

A method file in ``methods/`` decorates its class with ``@register_method``; importing the
``methods`` package imports every module in it, so dropping a new file there is all it takes.
"""
from __future__ import annotations

import fnmatch
import importlib
import pkgutil

from bench import BenchError

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
    _DISCOVERED = True


def list_methods(pattern: str = "*") -> list[str]:
    _discover()
    return sorted(n for n in _METHODS if fnmatch.fnmatch(n, pattern))


def get_method_class(name: str) -> type:
    _discover()
    if name not in _METHODS:
        raise BenchError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}")
    return _METHODS[name]
