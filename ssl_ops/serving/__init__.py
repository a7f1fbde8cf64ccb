"""Model serving: the MLflow Model Registry boundary (``model_registry``: the logged pyfunc model, ``ssl-ops
promote``, ``ssl-ops predict``) and MLflow's models-from-code entry point (``pyfunc_entry``).

With ``ssl_ops.tracking`` these are the only modules that import MLflow. This ``__init__`` imports nothing, so
``import ssl_ops.serving`` stays cheap; import the submodules.
"""
