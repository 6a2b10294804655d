"""Optional dependencies: import them where they are needed, with a one-line error naming the extra."""

import importlib
from types import ModuleType

# top-level module -> the extra of pyproject.toml that installs it
EXTRAS = {
    "transformers": "hf",
    "safetensors": "hf",
    "datasets": "hf",
    "tensorboard": "loggers",
    "wandb": "loggers",
    "mlflow": "loggers",
}


def require(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """`import module`, or an ImportError that says which extra installs it (e.g. `pip install -e '.[hf]'`).

    Args:
        module: The module to import (a submodule is fine; the message names its top-level package).
        feature: What needs it, as the user asked for it (`model=hf`, `logger=wandb`).
        extra: The extra that installs it; None = looked up in `EXTRAS` (else the package's own name).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        extra = extra or EXTRAS.get(package, package)
        raise ImportError(f"{feature} needs {package}: pip install -e '.[{extra}]'") from None
