"""The model lifecycle: tracking and the registry (``registry``), training runs (``train``),
evaluation (``evaluate``, ``metrics``, ``figures``), scoring a challenger once (``scoring``,
saved as ``scorecard``), the promotion gate (``gate``) and recording its decision
(``promotion``), change detection (``changes``) and drift (``monitoring``, ``drift``). The top
layer of the core.
"""
