"""Every method's descriptor, collected from the head files: a `METHODS` tuple of `method.Method`
in any module of kernels/heads/ is registered, so adding a method adds no line here.

REGISTRY maps the method name to its descriptor, in the order of docs/methods.md; PRESETS maps
every preset (run) name to (descriptor, keyword arguments)."""

import importlib
import pkgutil

from . import heads
from .method import Method


def _collect():
    found = []
    for info in sorted(pkgutil.iter_modules(heads.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{heads.__name__}.{info.name}")
        for method in getattr(module, "METHODS", ()):
            if not isinstance(method, Method):
                raise TypeError(f"{module.__name__}.METHODS must hold kernels.method.Method, got {method!r}")
            found.append(method)
    names = [m.name for m in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"methods registered twice: {duplicates}")
    return {m.name: m for m in sorted(found, key=lambda m: m.order)}


REGISTRY: dict[str, Method] = _collect()

PRESETS: dict[str, tuple[Method, dict]] = {
    preset: (method, dict(kwargs)) for method in REGISTRY.values() for preset, kwargs in method.presets
}


def get(name):
    """The descriptor of `name` (its registry name or an alias); ValueError naming the choices otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    for method in REGISTRY.values():
        if name in method.aliases:
            return method
    raise ValueError(f"method must be one of {', '.join(map(repr, REGISTRY))}; got {name!r}")
