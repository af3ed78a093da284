"""The web faces: the end-user app and the reviewer page, Voila notebooks.

``app.ipynb`` talks to the API over HTTP: ``client`` holds the HTTP client and the view model,
``ui`` the ipywidgets layout. ``review.ipynb`` (the reviewer page, an internal tool) reads the
feedback database and the store through ``dandelion_lib.data.feedback`` and
``dandelion_lib.data.review``; ``review`` holds its widgets. ``serve`` is the production Voila
launcher of both (``python -m dashboards.serve``, ``--review``), ``visits`` decides who gets a
session's kernel (browsers only, capped in all and per visitor, a queue page past the caps),
and ``lab`` starts JupyterLab on
the project's notebooks (``nox -s lab``).
Nothing here imports TensorFlow: a session's kernel stays small.
"""
