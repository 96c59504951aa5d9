"""One error family for training, export and the model store.

Every error here is a user-facing problem with the input (data, gene sets, artifacts) whose
message names the problem; the CLI prints it as ``error: ...`` and exits with status 2.
"""


class CellexplainError(Exception):
    """Base of the errors whose message is meant for the user.

    ``field`` optionally names the input (option, file part) the problem is about.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PreprocessError(CellexplainError, ValueError):
    """The expression matrix cannot be normalised as asked."""


class DataError(CellexplainError, ValueError):
    """The training data cannot be used."""


class GeneSetError(CellexplainError, ValueError):
    """A gene-set file is unusable for the model's genes."""


class StoreError(CellexplainError, RuntimeError):
    """A model cannot be imported into, or found in, the model store."""


class ArtifactError(CellexplainError, RuntimeError):
    """A model artifact is missing, corrupted or does not match its card."""


class ExportError(CellexplainError, RuntimeError):
    """The exported graph failed a parity or completeness check."""
