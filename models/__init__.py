"""cellexplain models: train interpretable cell-type classifiers and export them to ONNX.

Importing this package is light (no torch): training modules import torch themselves. It never
imports :mod:`cellexplain.service`, :mod:`cellexplain.client` or :mod:`cellexplain.api`.
"""
