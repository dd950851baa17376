"""Sans-IO NBD protocol: constants, wire layouts, events and the handshake/transmission state machines."""
