"""Error types. Every message names the input or file at fault, so nodes can show it as is."""


class GlanceError(ValueError):
    """Base class for errors a user can fix by changing an input."""


class ScheduleError(GlanceError):
    """A schedule request that cannot be built (bad steps, size or family)."""


class LoraFileError(GlanceError):
    """A LoRA file that cannot be read or does not fit; the message starts with the file's path."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class LoraMismatchError(LoraFileError):
    """A LoRA file whose modules do not match the model it is applied to."""
