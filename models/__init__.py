"""cellexplain models: train interpretable cell-type classifiers and export them to ONNX.

Importing this package is light (no torch): training modules import torch themselves.
"""

__version__ = "0.1.0"
