"""The error ``dm.batched`` raises when it is used wrongly."""


class BatchingError(RuntimeError):
    """``batched`` was used wrongly: outside a dm run, or with an unusable key or option."""
