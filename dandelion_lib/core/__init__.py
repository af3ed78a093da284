"""The foundations every layer uses: settings and labels (``config``), errors, run names
(``runs``), image acceptance (``images``), the model-input features (``features``) and the
object store (``storage``). Imports nothing else of dandelion_lib.
"""
