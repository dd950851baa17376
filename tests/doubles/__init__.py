"""Test doubles for the host-file layer: power loss and fault injection."""
