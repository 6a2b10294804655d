"""Optional dependencies: import them where they are needed, with a one-line error naming the extra."""

import importlib
from types import ModuleType

EXTRAS = {"transformers": "hf", "safetensors": "hf", "datasets": "hf"}


def require(module: str, feature: str) -> ModuleType:
    """`import module`, or an ImportError that says which extra installs it (e.g. `pip install -e '.[hf]'`)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], module)
        raise ImportError(f"{feature} needs {module.split('.')[0]}: pip install -e '.[{extra}]'") from None
