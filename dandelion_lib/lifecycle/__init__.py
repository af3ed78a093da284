"""The model lifecycle: tracking and the registry (``registry``), training runs (``train``),
scoring (``evaluate``), promotion (``promotion``), change detection (``changes``) and drift
monitoring (``monitoring``). The top layer of the core.
"""
