"""The end-user web app: a Voila notebook (``app.ipynb``) that talks to the API over HTTP.

``client`` holds the HTTP client and the view model, ``ui`` the ipywidgets layout and
``serve`` the production Voila launcher (``python -m dashboards.serve``). Nothing here
imports TensorFlow: an app session's kernel stays small.
"""
