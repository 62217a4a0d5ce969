"""One exception base for the converter, carrying the exit code the operator acts on.

Every failure the converter can foresee is raised as a `ConvertError` subclass whose exit code
says whether re-running the same spec could help (see the table in ptm_runtime.report).
Anything else escaping the pipeline is a bug and exits with EXIT_INTERNAL.
"""

from __future__ import annotations

from ptm_runtime.report import (
    EXIT_INTERNAL,
    EXIT_INVALID,
    EXIT_TRANSIENT,
    EXIT_VALIDATION_FAILED,
    PERMANENT_EXIT_CODES,
    Candidate,
)


class ConvertError(Exception):
    """A conversion failure with a reason (CamelCase) and an exit code."""

    exit_code: int = EXIT_INTERNAL
    reason: str = "InternalError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def permanent(self) -> bool:
        return self.exit_code in PERMANENT_EXIT_CODES


class InvalidSpec(ConvertError):
    """The options themselves are invalid (a field, a combination, an unknown format)."""

    exit_code = EXIT_INVALID
    reason = "InvalidSpec"


class InvalidSource(ConvertError):
    """The checkpoint cannot be used: missing, corrupt, refused pickle, wrong architecture,
    digest mismatch."""

    exit_code = EXIT_INVALID
    reason = "InvalidSource"


class ExportFailed(ConvertError):
    """No exporter could turn the model into ONNX (e.g. an unsupported operator)."""

    exit_code = EXIT_INVALID
    reason = "ExportFailed"


class Unavailable(ConvertError):
    """Network, object store or hub unavailable: worth retrying."""

    exit_code = EXIT_TRANSIENT
    reason = "Unavailable"


class ValidationFailed(ConvertError):
    """No candidate passed the gate; nothing is stored (fails closed)."""

    exit_code = EXIT_VALIDATION_FAILED
    reason = "ValidationFailed"

    def __init__(self, message: str, candidates: list[Candidate]) -> None:
        super().__init__(message)
        self.candidates = candidates
