"""watcher_plugins: fast Optuna search over small tabular models on GPUs, as a watcher plugin.

Importing this package is cheap on purpose: it imports neither torch nor a tree library, so a tree
worker process can import it without breaking the one-CUDA-framework-per-process rule.
"""

from watcher_plugins.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
