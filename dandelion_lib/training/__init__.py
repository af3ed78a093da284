"""Training: model builders (``model``) and the open-set detector (``openset``). Imports only
the data and core layers.
"""
