"""Serving: the ONNX Runtime artifacts (``runtime``) and the Predictor with its answer
policy (``predict``). Imports only the layers below it.
"""
