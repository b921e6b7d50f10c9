"""Where the cache keeps things: the disk cache, and the back ends replicas share."""
