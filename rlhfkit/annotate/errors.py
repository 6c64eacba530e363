"""Errors the annotation app turns into HTTP responses: `ApiError(status, detail)` becomes a 4xx JSON
{"detail": ...} on /api/ paths and an error message on the HTML pages."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and a message that says what to fix."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found")


def conflict(detail: str) -> ApiError:
    return ApiError(409, detail)


def invalid(detail: str) -> ApiError:
    return ApiError(422, detail)
