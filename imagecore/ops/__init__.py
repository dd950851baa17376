"""The offline operations, one module per qemu-img verb."""
