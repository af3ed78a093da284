"""The Airflow side of dandelion, beside the DAG files: hooks, callbacks and Python steps.

Airflow puts the DAG folder on ``sys.path``, so the DAG files import this package as
``dandelion_tasks``; it is the only code that imports both Airflow and ``dandelion_lib``. The
rules themselves live in ``dandelion_lib`` (data gate, change detection, promotion, summary);
everything heavy (pandas, MLflow, TensorFlow, papermill's results) is imported inside the
functions, so parsing a DAG file stays well under a second.

* :mod:`~dandelion_tasks.common`: the assets, the running task's settings and store, the
  ``{{ dandelion.* }}`` macros and the MLflow run-context tags;
* :mod:`~dandelion_tasks.retries`: the I/O steps' retries (:class:`GateRetryPolicy`);
* :mod:`~dandelion_tasks.hooks`: the notebook steps' hooks and the failure callbacks;
* :mod:`~dandelion_tasks.data_steps`: the dataset version a run trains on (``resolve_dataset``,
  the feedback watch, ``validate_data``);
* :mod:`~dandelion_tasks.model_steps`: ``check_changes``, the mapped feature extraction and
  ``promote``;
* :mod:`~dandelion_tasks.run_report`: ``report``, the run summary.
"""
