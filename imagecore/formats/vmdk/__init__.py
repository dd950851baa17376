"""vmdk: descriptor, sparse extents and stream-optimized images."""
