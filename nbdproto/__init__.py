"""The NBD protocol shared by the server (nbdsrv) and imagecore's NBD client driver: numbers, wire layouts and
a sans-IO client state machine.

It imports neither package (an import-linter contract keeps it so): nbdsrv's server core
(``nbdsrv.proto``) and imagecore's ``nbd`` block driver both build on it, and imagecore never imports
nbdsrv. Nothing here does I/O.
"""
