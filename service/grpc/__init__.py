"""gRPC front doors: the typed ``cellexplain.v1`` API and the Open Inference Protocol.

The Python modules for the ``.proto`` files in ``api/protos/`` are compiled by grpcio-tools into
``api/_generated/`` when the package is built or installed (``setup.py``; ``make proto`` after
editing a proto); an installed package never compiles, and nothing generated is edited or
committed.
"""
