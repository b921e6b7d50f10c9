"""Filling blobs from upstream while readers follow: fills, followers, download slots."""
