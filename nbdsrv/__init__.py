"""nbdsrv: an NBD server exporting the images of directory pools."""

__version__ = "0.1.0"
