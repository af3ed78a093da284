"""Data: sources and ingestion (``ingest``), dataset versions and their manifests
(``dataset``, ``splits``), the data gate (``datagate``), the feature store (``featurestore``)
and the feedback store (``feedback``). Imports only :mod:`dandelion_lib.core`.
"""
