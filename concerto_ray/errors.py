"""Errors that tell the user which sample, file and field are at fault."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file or value is invalid; raised before any cluster resource is taken."""


class TrainingError(RuntimeError):
    """A training run stopped for a reason its message explains (a corrupt checkpoint, non-finite losses)."""


class DataError(ValueError):
    """A sample on disk or in a shard is unusable.

    The message always names the sample, and where known the file and the field, so that a user
    can go and look at the bad input directly.
    """

    def __init__(self, problem: str, *, sample: str | None = None, file: str | None = None, field: str | None = None):
        self.problem = problem
        self.sample = sample
        self.file = file
        self.field = field
        where = []
        if sample is not None:
            where.append(f"sample {sample!r}")
        if file is not None:
            where.append(f"file {file!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)

    def __reduce__(self):  # keeps the keyword arguments across Ray's pickling of task errors
        return _rebuild_data_error, (self.problem, self.sample, self.file, self.field)


def _rebuild_data_error(problem, sample, file, field):
    return DataError(problem, sample=sample, file=file, field=field)
