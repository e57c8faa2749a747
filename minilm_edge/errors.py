"""Typed errors of minilm_edge.

The library raises these; only the CLI turns them into one line on stderr and an exit code
(`UsageError` -> 2, every other `MiniLMError` -> 1). Messages say what went wrong and what to do.
"""


class MiniLMError(Exception):
    """Base class of every error minilm_edge raises on purpose."""


class UsageError(MiniLMError):
    """A bad argument: empty prompt, out-of-range flag, unknown option value."""


class ModelNotFoundError(MiniLMError):
    """A model folder or one of its required files is missing."""


class UnsupportedModelError(MiniLMError):
    """The config asks for an architecture or feature this runtime does not implement."""


class CheckpointError(MiniLMError):
    """A weight file is truncated, corrupt, malicious, or a tensor has the wrong shape or dtype."""


class TokenizerError(MiniLMError):
    """tokenizer.json or the chat template cannot be read or rendered."""


class ContextOverflowError(MiniLMError):
    """The prompt (plus what is asked to be generated) does not fit the model's context."""


class PullError(MiniLMError):
    """A model could not be fetched: unknown name, no network and no fallback."""


class QuantFormatError(CheckpointError):
    """A quantized tensor set violates the int4 format (dtypes, shapes, index ranges)."""


class TrustError(MiniLMError):
    """A model is unsigned or its signature does not verify under the store's policy, or the policy
    file, a key or the store has unsafe permissions."""


class IntegrityError(CheckpointError):
    """A model folder differs from its manifest: a file missing, foreign, truncated or changed."""
