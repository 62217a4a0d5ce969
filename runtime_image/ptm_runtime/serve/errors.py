"""One error hierarchy for the serving runtime, each error carrying its status code.

Everything below the transports (model, batching, data plane) raises these; each transport maps
them once (REST: the HTTP status and `{"error": message}`, gRPC: the status code and details), the
shape MLServer and KServe use. The message is what the client reads, so it names the problem
precisely (which input, what was expected, what arrived).
"""

from __future__ import annotations

from enum import StrEnum


class GrpcCode(StrEnum):
    """gRPC status code names (grpc.StatusCode members), kept here so this module needs no grpc."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"
    UNIMPLEMENTED = "UNIMPLEMENTED"


class ServeError(Exception):
    """Base: a failure a client sees, with the HTTP status and the gRPC code it maps to."""

    status_code: int = 500
    grpc_code: GrpcCode = GrpcCode.INTERNAL
    #: REST: the answer ends the connection (what the client was sending may still arrive).
    closes_connection: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServeError):
    """The request does not fit the protocol or the model (400 / INVALID_ARGUMENT)."""

    status_code = 400
    grpc_code = GrpcCode.INVALID_ARGUMENT


class ModelNotFound(ServeError):
    """Unknown model name or version (404 / NOT_FOUND)."""

    status_code = 404
    grpc_code = GrpcCode.NOT_FOUND


class PayloadTooLarge(ServeError):
    """Body over the configured maximum (413 / RESOURCE_EXHAUSTED)."""

    status_code = 413
    grpc_code = GrpcCode.RESOURCE_EXHAUSTED


class UnsupportedMediaType(ServeError):
    """A content encoding the server does not speak (415 / INVALID_ARGUMENT)."""

    status_code = 415
    grpc_code = GrpcCode.INVALID_ARGUMENT


class QueueFull(ServeError):
    """Back-pressure: the batching queue is full (429 / RESOURCE_EXHAUSTED); retry later."""

    status_code = 429
    grpc_code = GrpcCode.RESOURCE_EXHAUSTED


class Unavailable(ServeError):
    """Not ready: the model is loading or the server is draining (503 / UNAVAILABLE)."""

    status_code = 503
    grpc_code = GrpcCode.UNAVAILABLE


class RequestTimeout(ServeError):
    """The request's body did not arrive within the request timeout (408 / DEADLINE_EXCEEDED)."""

    status_code = 408
    grpc_code = GrpcCode.DEADLINE_EXCEEDED
    closes_connection = True


class DeadlineExceeded(ServeError):
    """The request's deadline passed before it was answered (504 / DEADLINE_EXCEEDED)."""

    status_code = 504
    grpc_code = GrpcCode.DEADLINE_EXCEEDED


class InternalError(ServeError):
    """The model failed on a request that passed validation (500 / INTERNAL)."""

    status_code = 500
    grpc_code = GrpcCode.INTERNAL


class ArtifactError(Exception):
    """The artifact cannot be served (missing file, sha256 mismatch, unsupported tensor types).

    Raised at start-up, not per request: the server exits non-zero with this message.
    """
