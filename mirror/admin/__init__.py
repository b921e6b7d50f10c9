"""What the cache holds and its upkeep: inventory, purge, pin, verify."""
