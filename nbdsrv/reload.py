"""Live reconfiguration: what `reload-config` and SIGHUP apply to a running server.

The configuration is read again (the TOML file and the command line, as at start-up) and reconciled with
the server: pools that appeared are added, pools that went are removed unless one of their volumes is open
(then they stay, and the answer says so), a pool whose path changed is replaced on the same terms, and
read-only flags, connection limits and the log level take the new values, and the TLS credentials, the
TLS mode and the access rules are read again. Running connections keep what they negotiated, the TLS
session and rules they started with, and the per-connection limits they started with; new ones get the
new values. Listening
addresses and the admin socket are fixed for the life of the process. Pools added with `pool-add` are the
operator's, not the file's, and a reload leaves them alone.
"""

from __future__ import annotations

import logging
from typing import Any

from .config import ServerConfig
from .exports import ExportRegistry
from .pools import Pool, pool_from_config
from .server import NBDServer
from .tls import server_security

log = logging.getLogger("nbdsrv")

# ServerConfig fields a reload copies onto the NBDServer of the same name.
LIVE_LIMITS = ("max_requests", "max_bytes", "max_total_bytes", "handshake_timeout", "max_connections",
               "max_connections_per_address", "max_handshakes", "max_handshakes_per_address")


def pool_in_use(registry: ExportRegistry, pool: Pool) -> bool:
    """True while any volume of ``pool`` is open for an NBD client."""
    return any(registry.is_open(vol) for vol in pool.volumes())


def apply(server: NBDServer, cfg: ServerConfig, *, runtime_pools: set[str]) -> dict[str, Any]:
    """Reconcile ``server`` with ``cfg``; returns what changed, as reload-config answers it."""
    # first, since it may fail (a certificate that does not load, an authz file that does not parse):
    # then nothing at all has changed
    tls_mode, tls_creds, policy = server_security(cfg)
    pools = server.registry.pools
    added: list[str] = []
    removed: list[str] = []
    busy: list[str] = []
    wanted = {p.name: p for p in cfg.pools}
    for name, pool in list(pools.pools.items()):
        if name in runtime_pools:
            continue
        want = wanted.get(name)
        if want is not None and pool.same_place(want):
            pool.read_only = want.read_only
            continue
        if pool_in_use(server.registry, pool):
            busy.append(name)
            continue
        pools.remove(name)
        removed.append(name)
    for name, pc in wanted.items():
        if name not in pools.pools and name not in busy:
            pools.add(pool_from_config(pc))
            added.append(name)
    limits: dict[str, Any] = {}
    for key in LIVE_LIMITS:
        new = getattr(cfg, key)
        if getattr(server, key) != new:
            setattr(server, key, new)
            limits[key.replace("_", "-")] = new
    level = getattr(logging, cfg.log_level.upper(), logging.INFO)
    if logging.getLogger().level != level:
        logging.getLogger().setLevel(level)
        limits["log-level"] = cfg.log_level
    if server.registry.read_only != cfg.read_only:
        # the flag applies to images opened from now on; open instances keep their mode
        server.registry.read_only = cfg.read_only
        limits["read-only"] = cfg.read_only
    # new credentials, mode and rules for new connections; running ones hold their own references
    server.tls_mode, server.tls_creds, server.policy = tls_mode, tls_creds, policy
    tls_info = {"mode": tls_mode, "credentials": tls_creds.directory if tls_creds is not None else None,
                "verify-peer": bool(tls_creds is not None and tls_creds.verify_peer)}
    result = {"pools-added": added, "pools-removed": removed, "pools-in-use": busy, "changed": limits,
              "tls": tls_info}
    log.info("configuration reloaded", extra={k: v for k, v in result.items() if v})
    return result
