"""Clients of the service: :class:`Client` / :class:`AsyncClient` (REST or gRPC), the ``.h5ad``
pipeline, :func:`read` (any single-cell file format into AnnData), the HTML report and the
``cellexplain`` command.

Installs with the base dependencies alone (``pip install cellexplain``); the server
(``[serve]``) and training (``[train]``) are imported only by the commands that need them.
The clients are imported when first named, so that the ``cellexplain`` command (this
package's ``cli``) does not load anndata for a command that reads no file (``--version``,
``models list``, a usage error): a second saved on each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellexplain.client.readers import read
    from cellexplain.client.remote import AnswerWarning, AsyncClient, Client, ClientError, annotate

__all__ = ["AnswerWarning", "AsyncClient", "Client", "ClientError", "annotate", "read"]


if not TYPE_CHECKING:  # type checkers see the imports above, and a misspelt name stays an error

    def __getattr__(name: str) -> Any:
        if name in __all__:
            from cellexplain.client import readers, remote

            value = getattr(readers if name == "read" else remote, name)
            globals()[name] = value  # once: later lookups are plain attributes
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
