"""Talking to upstream registries: the v2 client, its authentication, redirect checks."""
