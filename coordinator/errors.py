"""Domain errors of the coordinator core; the servicer maps them to gRPC codes in one place."""


class CoordinatorError(Exception):
    """Base: a request the core refuses."""


class InvalidArgument(CoordinatorError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(CoordinatorError):
    pass


class FailedPrecondition(CoordinatorError):
    pass


class AlreadyExists(CoordinatorError):
    pass


class PermissionDenied(CoordinatorError):
    """The caller is known, but this is not theirs to do (another client's job, another worker's frames)."""


class ResourceExhausted(CoordinatorError):
    """A limit that protects the coordinator (queued jobs, watchers, bytes) is reached."""
