"""qcow2: layout, table math, caches, allocator and the driver."""
