"""dandelion: classify photos as dandelion or grass, end to end.

The core is layered, each sub-package importing only those below it: ``core`` → ``data`` →
``training`` → ``serving`` → ``lifecycle``. The command line (``cli``), the embedded pipeline
runner (``pipeline``) and the run summary (``summary``) sit above them, beside the faces.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
