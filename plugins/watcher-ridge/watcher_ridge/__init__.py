"""watcher-ridge: a linear baseline for compare_models, and the example of a plugin that adds a model type."""
