"""The one error tree of impasto, each error carrying its Runware wire `code`.

    ImpastoError
    ├── RequestError                 the body as a whole is unusable (400)
    │   ├── PayloadTooLarge          body over the configured limit (413)
    │   └── TooManyTasks             more tasks in one request or frame than allowed (413)
    ├── AuthError                    missing or rejected API key (401)
    ├── InvalidParameter             one task parameter is wrong (400)
    │   ├── UnsupportedParameter     a known parameter the model does not take
    │   ├── UnknownParameter         not a parameter of this task type
    │   ├── ModelNotFound            no such AIR in the registry
    │   └── ContentBlocked           safety.blockContent flagged the input
    ├── ConflictTaskUUID             the taskUUID was used before (400)
    ├── TaskNotFound                 getResponse for an unknown or expired task (404)
    ├── QueueFull                    too many images waiting; retry later (429)
    ├── RateLimited                  over the API key's (or address's) rate; Retry-After (429)
    ├── PermissionDenied             the API key may not do this (403)
    ├── ProviderError                a provider (Runway, ...) failed or refused (502)
    │   ├── ProviderNotConfigured    no credentials for the provider (503)
    │   ├── ProviderKeyRejected      the provider refused our credentials (502)
    │   ├── ProviderRateLimited      the provider's quota or rate limit was hit (429)
    │   ├── ProviderTimeout          the provider did not answer or finish in time (504)
    │   └── ProviderContentRejected  the provider's moderation refused input or output (400)
    ├── UploadFailed                 the PUT to uploadEndpoint failed; the image is kept (502)
    ├── InferenceError               a local backend failed on accepted work (500)
    ├── TaskInterrupted              the server stopped while the task ran (500)
    ├── ServiceUnavailable           the state store or image storage cannot be used (503)
    │   └── StorageFull              no space left to store images or state (503)
    └── SyncTimeout                  sync wait limit hit; the task goes on (202)

Every error becomes one Runware error item: `code`, `message`, `parameter`, `taskType`,
`taskUUID`. Messages never carry stack traces or a provider's raw text.
"""

from __future__ import annotations

import math
from typing import Any


def code_name(parameter: str) -> str:
    """`width` -> `Width`, for codes such as `invalidWidth`."""
    return parameter[:1].upper() + parameter[1:]


class ImpastoError(Exception):
    """Base of every error that is reported to a client as a Runware error item."""

    code = "unknownError"
    http_status = 500

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        parameter: str | None = None,
        task_type: str | None = None,
        task_uuid: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.parameter = parameter
        self.task_type = task_type
        self.task_uuid = task_uuid

    def for_task(self, task_type: str | None, task_uuid: str | None) -> ImpastoError:
        """Attach the task context unless it is already set; returns self."""
        if self.task_type is None:
            self.task_type = task_type
        if self.task_uuid is None:
            self.task_uuid = task_uuid
        return self

    def to_item(self) -> dict[str, Any]:
        """The Runware error item for the wire."""
        item: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.parameter is not None:
            item["parameter"] = self.parameter
        if self.task_type is not None:
            item["taskType"] = self.task_type
        if self.task_uuid is not None:
            item["taskUUID"] = self.task_uuid
        return item

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> ImpastoError:
        """Rebuild an error stored as a wire item, with the HTTP status of its code."""
        error = ImpastoError(
            str(item.get("message", "")),
            code=str(item.get("code", cls.code)),
            parameter=item.get("parameter"),
            task_type=item.get("taskType"),
            task_uuid=item.get("taskUUID"),
        )
        error.http_status = status_of_code(error.code)
        return error


class RequestError(ImpastoError):
    code = "invalidRequestBody"
    http_status = 400


class PayloadTooLarge(RequestError):
    code = "payloadTooLarge"
    http_status = 413


class TooManyTasks(RequestError):
    code = "tooManyTasks"
    http_status = 413


class AuthError(ImpastoError):
    code = "invalidApiKey"
    http_status = 401


class InvalidParameter(ImpastoError):
    code = "invalidParameter"
    http_status = 400


class UnsupportedParameter(InvalidParameter):
    code = "unsupportedParameter"


class UnknownParameter(InvalidParameter):
    code = "unknownParameter"


class ModelNotFound(InvalidParameter):
    code = "invalidModel"


class ContentBlocked(InvalidParameter):
    code = "sensitiveContentDetected"


class ConflictTaskUUID(ImpastoError):
    code = "conflictTaskUUID"
    http_status = 400


class TaskNotFound(ImpastoError):
    code = "taskNotFound"
    http_status = 404


class QueueFull(ImpastoError):
    # compat: the SDKs retry a 429 with backoff; nothing was accepted, so the same taskUUID
    # is still free when they do.
    code = "rateLimitExceeded"
    http_status = 429


class RateLimited(ImpastoError):
    """Over a limit of the API key (tasks or images a minute, tasks at once) or of the client
    address (failed authentications). Nothing was accepted: the same taskUUID may be sent
    again after `retry_after_s` (the REST reply's Retry-After)."""

    code = "rateLimitExceeded"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float, **context: Any) -> None:
        super().__init__(message, **context)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class PermissionDenied(ImpastoError):
    code = "insufficientPermissions"
    http_status = 403


class ProviderError(ImpastoError):
    code = "providerError"
    http_status = 502


class ProviderNotConfigured(ProviderError):
    code = "providerNotConfigured"
    http_status = 503


class ProviderKeyRejected(ProviderError):
    code = "invalidProviderApiKey"
    http_status = 502


class ProviderRateLimited(ProviderError):
    code = "providerRateLimitExceeded"
    http_status = 429


class ProviderTimeout(ProviderError):
    code = "timeoutProvider"
    http_status = 504


class ProviderContentRejected(ProviderError):
    # Runware: "rejected by the provider's moderation; not charged". The client's content is
    # the cause, so a 4xx like our own blocked-content error.
    code = "invalidProviderContent"
    http_status = 400


class UploadFailed(ImpastoError):
    code = "uploadFailed"
    http_status = 502


class InferenceError(ImpastoError):
    code = "inferenceError"
    http_status = 500


class TaskInterrupted(ImpastoError):
    code = "taskInterrupted"
    http_status = 500


class ServiceUnavailable(ImpastoError):
    """Infrastructure, not the client: retry later (the reply carries Retry-After)."""

    code = "serviceUnavailable"
    http_status = 503
    retry_after_s = 5


class StorageFull(ServiceUnavailable):
    code = "storageFull"


class SyncTimeout(ImpastoError):
    # compat: 2xx, not 504: the new Python SDK retries 5xx with the same taskUUID, which
    # would only earn a conflictTaskUUID; the task is still running and getResponse has it.
    code = "syncTimeout"
    http_status = 202


_CLIENT_PREFIXES = ("invalid", "missing", "unsupported", "unknown", "conflict", "mismatch")


def status_of_code(code: str) -> int:
    """The HTTP status that goes with a wire code."""
    pending: list[type[ImpastoError]] = [ImpastoError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls.http_status
        pending.extend(cls.__subclasses__())
    return 400 if code.startswith(_CLIENT_PREFIXES) else 500


def http_status_for(errors: list[ImpastoError]) -> int:
    """The HTTP status of a REST reply that carries only these errors."""
    if not errors:
        return 200
    statuses = {e.http_status for e in errors}
    # One kind of failure gives its own status; a mix of client errors reads as a 400.
    if len(statuses) == 1:
        return statuses.pop()
    client = [s for s in statuses if 400 <= s < 500]
    return 400 if client else max(statuses)
