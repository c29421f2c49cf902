"""NumPy-only neural-network engine: functional math, layers, init schemes, model builders.

Nothing here imports hydra, mlflow or optuna.
"""

from sweeps.nn.init import Init
from sweeps.nn.model import Sequential, deep_convnet, mlp, simple_convnet

__all__ = ["Init", "Sequential", "deep_convnet", "mlp", "simple_convnet"]
