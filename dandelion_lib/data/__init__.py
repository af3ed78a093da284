"""Data: ingestion (``ingest``, over ``sources`` and ``httpsource``, with ``pool``,
``provenance``, ``quality`` and ``rejections``), dataset versions and their manifests
(``dataset``, ``splits``), the data gate (``datagate``), the feature store (``featurestore``),
the feedback store (``feedback``) and the reviewer's queue (``review``). Imports only
:mod:`dandelion_lib.core`.
"""
