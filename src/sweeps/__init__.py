"""sweeps: a NumPy trainer for the training tricks of "Deep Learning from Scratch",
composed by Hydra, searched by Optuna and recorded by MLflow.

Imports point down: ``nn`` (NumPy math) <- ``optim`` <- ``train`` <- ``tracking``/``search`` <- CLI.
"""

__version__ = "0.1.0"
