"""Clients of the service: :class:`Client` / :class:`AsyncClient` (REST or gRPC), the ``.h5ad``
pipeline, the HTML report and the ``cellexplain`` command.

Installs with the base dependencies alone (``pip install cellexplain``); the server
(``[serve]``) and training (``[train]``) are imported only by the commands that need them.
"""

from cellexplain.client.remote import AsyncClient, Client, ClientError, annotate

__all__ = ["AsyncClient", "Client", "ClientError", "annotate"]
