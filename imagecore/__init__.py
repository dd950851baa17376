"""imagecore: the disk-image format core (raw, qcow2, vmdk) and its qemu-img-compatible command."""

__version__ = "0.1.0"
