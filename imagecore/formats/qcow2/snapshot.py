"""The qcow2 snapshot table: parsing, encoding and qemu-img info's JSON view of each entry."""

from __future__ import annotations
