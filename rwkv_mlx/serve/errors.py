"""What a failed request gets back: an HTTP status and an OpenAI-style error body, never a traceback."""

from __future__ import annotations


class APIError(Exception):
    """A request the server refuses or could not finish. ``body()`` is what OpenAI clients parse."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def queue_full(depth: int) -> APIError:
    return APIError(429, f"the server is busy: {depth} requests are already waiting; retry later",
                    type="rate_limit_error", code="queue_full")


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within the server's {seconds:g} s limit",
                    type="timeout_error", code="timeout")


def internal(message: str = "internal error while generating; the server logged the details") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def state_exists(name: str) -> APIError:
    return APIError(409, f"save_state {name!r}: a state of that name exists; saved states are never overwritten "
                         f"(continue from it with initial_state, or pick a new name)",
                    param="save_state", code="state_exists")


def no_state(name: str) -> APIError:
    return bad_request(f"initial_state {name!r}: no such state in the server's state directory", "initial_state")


def no_states_dir() -> APIError:
    return bad_request("save_state needs a server started with --states-dir or --cache-dir", "save_state")
