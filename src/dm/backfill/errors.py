"""The exceptions of ``dm.batched``: its misuse, and a stop at a batch boundary."""


class BatchingError(RuntimeError):
    """``batched`` was used wrongly: outside a dm run, or with an unusable key or option."""


class LoopStop(BaseException):
    """Raised after a batch committed to stop the loop there (the engine's
    ``StopAtBoundary``): a ``BaseException``, which revision code catching ``Exception``
    cannot swallow."""
