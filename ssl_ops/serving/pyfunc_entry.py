"""MLflow "model from code" entry point of every model ssl-ops logs (see ssl_ops/serving/model_registry.py).

MLflow copies this file into the logged model and runs it at load time instead of unpickling a Python
object; ``ImageClassifierModel.load_context`` then reads the weights with ``torch.load(weights_only=True)``.
Part of the registry boundary, so it may import mlflow.
"""

import mlflow

from ssl_ops.serving.model_registry import ImageClassifierModel

mlflow.models.set_model(ImageClassifierModel())
