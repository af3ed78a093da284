"""Training: the recipe (``config``), the data a run reads (``inputs``), the backbone features
(``extraction``), the fitting (``fitting``), the model builders (``model``, ``lite0``) and the
open-set detector (``openset``). Imports only the data and core layers.
"""
