"""gRPC front doors: the typed ``cellexplain.v1`` API and the Open Inference Protocol.

The Python modules for the ``.proto`` files in ``protos/`` are generated with grpcio-tools into
``_generated/`` (``make proto``, or on first import when missing); nothing generated is edited
or committed.
"""
