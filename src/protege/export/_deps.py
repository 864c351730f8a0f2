"""The optional dependencies of ``protege export`` (the ``export`` extra), imported when needed."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ProtegeError

#: what ``pip install 'protege[export]'`` brings: the ONNX format, its runtime, the dynamo exporter's backend
PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def require(*names: str) -> dict[str, ModuleType]:
    """The modules ``names`` (default: all of :data:`PACKAGES`), or a :class:`ProtegeError` that says
    which is missing and how to install them."""
    modules = {}
    for name in names or PACKAGES:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError as e:
            raise ProtegeError(
                f"protege export --format onnx/int8 needs {', '.join(PACKAGES)}; {name} cannot be imported "
                f"({e}). Install them with: pip install 'protege[export]'"
            ) from None
    return modules
