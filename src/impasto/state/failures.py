"""The shape every store's failure translation shares: a context manager that re-raises a
failure of the service behind the store as ServiceUnavailable (or StorageFull), and lets every
other exception through unchanged."""

from __future__ import annotations

from types import TracebackType

from impasto.protocol.errors import ServiceUnavailable


class FailureTranslation:
    """`with failures:` around a store's call; subclasses say what maps to what."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            translated = self.translate(exc)
            if translated is not None:
                raise translated from exc

    def translate(self, exc: BaseException) -> ServiceUnavailable | None:
        """The error to raise instead of `exc`, or None to let `exc` through."""
        raise NotImplementedError
