"""Names of a package imported on first use (PEP 562), so that importing the package loads nothing heavy."""

from __future__ import annotations

import importlib
import sys
import types


def lazy_exports(module_globals: dict, table: dict[str, str]):
    """(__getattr__, __dir__) for a package: ``table`` maps each public name to the module that defines it, or
    to "module:" for the module itself. A name is imported when first read and then kept in the package."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {name!r}")
        target = table[name]
        value = importlib.import_module(target[:-1]) if target.endswith(":") else \
            getattr(importlib.import_module(target), name)
        module_globals[name] = value
        return value

    def __dir__():
        return sorted(set(module_globals) | set(table))

    class LazyPackage(types.ModuleType):
        """Loading a submodule binds it to the package under its name; where the package exports a function of
        the same name (catchtag.scan), the function stays, whichever was imported first."""

        def __setattr__(self, name, value):
            if isinstance(value, types.ModuleType) and table.get(name) == value.__name__ and hasattr(value, name):
                value = getattr(value, name)
            super().__setattr__(name, value)

    sys.modules[module_globals["__name__"]].__class__ = LazyPackage
    return __getattr__, __dir__
