"""PEP 562 lazy exports shared by ``lava`` and ``lava.evaluation``: a public name is imported from
its submodule on first use, so ``import lava`` and the CLI's ``--help`` load no torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict, submodules: Iterable[str] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the submodule
    defining it (the value is cached in the package ``namespace`` on first use); ``submodules``
    are returned as modules."""
    modules = frozenset(submodules)

    def __getattr__(name: str):
        if name in modules:
            return importlib.import_module(f".{name}", package)
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *namespace.get("__all__", ())})

    return __getattr__, __dir__
