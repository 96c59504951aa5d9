"""The contract shared by the server and its clients: request and response schemas, the
errors (each with its HTTP status, OIP body and gRPC code), annotations as AnnData, the
protobuf codec and the modules generated from ``protos/`` when the package is built.

Light by design: pydantic, numpy, scipy, anndata and protobuf; no onnxruntime, BentoML or
Prometheus.
"""
