"""Domain errors of the coordinator core; the servicer maps them to gRPC codes in one place."""


MAX_DETAIL = 1000  # characters of an error's text a caller gets: it may echo input (a 1 MB model name)


class CoordinatorError(Exception):
    """Base: a request the core refuses."""

    @property
    def detail(self) -> str:
        """The text for the caller (gRPC details, HTTP error JSON), at most MAX_DETAIL characters."""
        text = str(self)
        return text if len(text) <= MAX_DETAIL else f"{text[:MAX_DETAIL]}... ({len(text)} characters)"


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
