"""What the registry needs before a qcow2 image is opened: the magic, the probe, the create options."""

from __future__ import annotations

from ...driver import CreateOption

MAGIC = 0x514649FB  # "QFI\xfb"

# The create options in qemu 7.2's order (qcow2_create_opts, which its "Formatting ..." line follows), with
# the defaults that line shows; `-o help` lists them sorted.
CREATE_OPTIONS: tuple[CreateOption, ...] = (
    CreateOption("encryption", "bool",
                 "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    CreateOption("encrypt.format", "string", "Encrypt the image, format choices: 'aes', 'luks'"),
    CreateOption("encrypt.key-secret", "string", "ID of secret providing qcow AES key or LUKS passphrase"),
    CreateOption("encrypt.cipher-alg", "string", "Name of encryption cipher algorithm"),
    CreateOption("encrypt.cipher-mode", "string", "Name of encryption cipher mode"),
    CreateOption("encrypt.ivgen-alg", "string", "Name of IV generator algorithm"),
    CreateOption("encrypt.ivgen-hash-alg", "string", "Name of IV generator hash algorithm"),
    CreateOption("encrypt.hash-alg", "string", "Name of encryption hash algorithm"),
    CreateOption("encrypt.iter-time", "number", "Time to spend in PBKDF in milliseconds"),
    CreateOption("cluster_size", "size", "qcow2 cluster size", "65536"),
    CreateOption("extended_l2", "bool", "Extended L2 tables", "off"),
    CreateOption("preallocation", "string",
                 "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    CreateOption("compression_type", "string", "Compression method used for image cluster compression",
                 "zlib"),
    CreateOption("size", "size", "Virtual disk size"),
    CreateOption("compat", "string", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    CreateOption("backing_file", "string", "File name of a base image"),
    CreateOption("backing_fmt", "string", "Image format of the base image"),
    CreateOption("data_file", "string", "File name of an external data file"),
    CreateOption("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    CreateOption("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
    CreateOption("refcount_bits", "number", "Width of a reference count entry in bits", "16"),
)

# its options in json:{...} names and --image-opts (qapi BlockdevOptionsQcow2, 7.2)
OPEN_OPTIONS = ("backing", "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
                "pass-discard-other", "overlap-check", "cache-size", "l2-cache-size", "l2-cache-entry-size",
                "refcount-cache-size", "cache-clean-interval", "encrypt", "data-file")


def probe(head: bytes, filename: str) -> int:
    """100 for a qcow2 magic (any version), else 0."""
    if len(head) >= 8 and int.from_bytes(head[:4], "big") == MAGIC \
            and int.from_bytes(head[4:8], "big") >= 2:
        return 100
    return 0
