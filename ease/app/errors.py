"""One-line error messages for `train.py`: what went wrong, the key, and what is allowed, without a traceback.

Hydra reports its own errors (unknown options, mistyped keys, an unreachable sweeper database, an output folder
it cannot create) over several lines or as a full traceback. `train.py` asks Hydra to re-raise them
(HYDRA_FULL_ERROR) and prints `one_line_error(err)` instead; `debug=true` or HYDRA_FULL_ERROR=1 from the user
keeps the full traceback. A message longer than `MAX_MESSAGE` characters is shortened (`shorten`): long values
are cut in the middle, so a 5,000-number list does not make a 25 KB line; the key at the start stays.
"""

import re

from hydra.errors import MissingConfigException

MAX_MESSAGE = 300  # characters
_KEEP = 24  # characters kept at each end of a long value
# A value inside a message: a list, tuple, dict or quoted string without nesting, or a run of non-blanks.
_VALUE = re.compile(r"\[[^\[\]]*\]|\([^()]*\)|\{[^{}]*\}|'[^'\n]*'|\"[^\"\n]*\"|\S+")
_KEY_PREFIX = re.compile(r"^[\w.\[\]-]+: ")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def _cut(value: str) -> str:
    return value if len(value) <= 2 * _KEEP + 5 else f"{value[:_KEEP]} ... {value[-_KEEP:]}"


def shorten(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message` in at most about `limit` characters: each long value cut in the middle with `...`, then, if still
    too long, the middle of the message; the key at the start and the message's end stay."""
    if len(message) <= limit:
        return message
    match = _KEY_PREFIX.match(message)
    head = match.group(0) if match else ""
    text = head + _VALUE.sub(lambda m: _cut(m.group(0)), message[len(head) :])
    if len(text) > limit:
        half = (limit - 5) // 2
        text = f"{text[:half]} ... {text[-half:]}"
    return text


def one_line_error(err: BaseException) -> str:
    """A single line that names the key and what is allowed, for any error raised while composing or running."""
    return shorten(_one_line(err))


def _one_line(err: BaseException) -> str:
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = ", ".join(err.options or [])
        if group:
            return f"{group}: unknown option {option!r}; available: {options}"
        return f"config {err.missing_cfg_file!r} not found"
    if isinstance(err, OSError) and err.filename:
        # Outside a job, Hydra's file errors come from making or writing the output folder.
        return f"output folder: {err.strerror}: {err.filename} (hydra.run.dir / hydra.sweep.dir must be writable)"
    if type(err).__module__.startswith(("sqlalchemy", "optuna.storages")):
        # The sweeper failed opening its storage: the reason ease.app.studies found (key and URL) if any.
        from ease.app.studies import last_refusal

        refusal = last_refusal()
        if refusal is not None:
            return refusal
        return f"hydra.sweeper.storage: cannot open the database: {type(err).__name__}: {_first_line(str(err))}"
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
