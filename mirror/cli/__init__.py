"""The ``mirror`` command."""
