"""One-line error messages for `train.py`: what went wrong, the key, and what is allowed, without a traceback.

Hydra reports its own errors (unknown options, mistyped keys, an unreachable sweeper database, an output folder
it cannot create) over several lines or as a full traceback. `train.py` asks Hydra to re-raise them
(HYDRA_FULL_ERROR) and prints `one_line_error(err)` instead; `debug=true` or HYDRA_FULL_ERROR=1 from the user
keeps the full traceback.
"""

import re

from hydra.errors import MissingConfigException


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def one_line_error(err: BaseException) -> str:
    """A single line that names the key and what is allowed, for any error raised while composing or running."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = ", ".join(err.options or [])
        if group:
            return f"{group}: unknown option {option!r}; available: {options}"
        return f"config {err.missing_cfg_file!r} not found"
    if isinstance(err, OSError) and err.filename:
        # Outside a job, Hydra's file errors come from making or writing the output folder.
        return f"output folder: {err.strerror}: {err.filename} (hydra.run.dir / hydra.sweep.dir must be writable)"
    cause = err.__cause__
    full_key = None
    if cause is not None:
        match = re.search(r"full_key: (\S+)", str(cause))
        full_key = match.group(1) if match else None
        message = _first_line(str(cause))
    else:
        message = _first_line(str(err))
    # OmegaConf wraps a resolver's error: "ValueError raised while resolving interpolation: <the real message>".
    message = re.sub(r"^\w+ raised while resolving interpolation: ", "", message)
    if re.match(r"^[\w.]+: ", message):  # already names its key
        return message
    if full_key and not message.startswith(full_key):
        message = f"{full_key}: {message}"
    if not full_key:
        name = type(cause or err).__name__
        message = message if name in message else f"{name}: {message}"
    return message
