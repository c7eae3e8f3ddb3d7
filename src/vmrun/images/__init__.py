"""Disk images: the content-addressed store, format inspection and safety, disk operations."""
