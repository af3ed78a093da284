"""The Airflow side of dandelion, beside the DAG files: hooks, callbacks and Python steps.

Airflow puts the DAG folder on ``sys.path``, so the DAG files import this package as
``dandelion_tasks``; it is the only code that imports both Airflow and ``dandelion_lib``.
"""
