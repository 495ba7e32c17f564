"""The one exception type of the data pipeline.

It subclasses `ConfigError` because every data failure a user can cause (a wrong path, a malformed
file, a corrupted cache) is fixed by changing their inputs, and the CLI already turns `ConfigError`
into a one-line message instead of a traceback.
"""

from __future__ import annotations

from frugalm.config import ConfigError


class DataError(ConfigError):
    """Input data, tokenizer files or token shards that cannot be used; the message says which and why."""
