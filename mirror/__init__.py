"""mirror: a pull-through cache for container registries."""

__version__ = "0.1.0"
