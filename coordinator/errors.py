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
