"""Disk encryption as qemu does it: the LUKS1 container (header, key slots, PBKDF2, the anti-forensic
splitter), the sector ciphers with their IV generators, and legacy qcow AES; ciphers come from the
``cryptography`` package, none is written here."""
