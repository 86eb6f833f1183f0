"""MLflow "model from code" entry point: the logged model is this file, not a pickled object."""

import mlflow.models

from training.pyfunc import TNetPyfunc

mlflow.models.set_model(TNetPyfunc())
