"""Models: the built-ins (builtin.py) and `build_model`, which also imports a user's factory (factory.py).

`from rayscale.models import MLP` is what a user factory that wraps a built-in imports.
"""

from rayscale.models.builtin import CNN, MLP, Transformer
from rayscale.models.factory import BUILTIN_MODELS, build_model

__all__ = ["BUILTIN_MODELS", "CNN", "MLP", "Transformer", "build_model"]
