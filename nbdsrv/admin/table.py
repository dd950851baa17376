"""The admin command table itself: rows (name, argument model, return shape, handler) and their context.

The rows are declared in the command modules (``commands`` and the per-concern modules it imports); this
module holds what they share, so that each can register its rows without importing the others.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imagecore.errors import NotFoundError
from imagecore.version import package_version

from ..exports import ExportRegistry
from ..pools import Pool, PoolSet, Volume
from .schema import describe_arguments, object_entry, parse_arguments

if TYPE_CHECKING:
    from ..server import NBDServer
    from .jobs import JobManager


class CommandNotFoundError(NotFoundError):
    """A command name the table does not have (QMP's own error class for it)."""

    json_class = "CommandNotFound"


def version_record() -> dict[str, Any]:
    """query-version's answer, in QMP's shape, which is also what the greeting carries."""
    version = package_version()
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:3]] + [0, 0, 0]
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
            "package": f"nbdsrv {version}"}


@dataclass(slots=True)
class AdminContext:
    """What handlers may touch: the server's pools and exports, and a way to stop it."""

    pools: PoolSet
    registry: ExportRegistry
    request_stop: Callable[[], None]
    emit: Callable[[str, dict[str, Any] | None], None] = lambda name, data: None
    clients: Callable[[], list[dict[str, Any]]] = list
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False
    # the NBD server itself (connections, counters); None only in tests of the table alone
    server: NBDServer | None = None
    # re-read the configuration (reload-config and SIGHUP); returns what changed
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None
    # names of the pools added with pool-add (a reload leaves them alone)
    runtime_pools: set[str] = field(default_factory=set)
    # the job manager (image operations in worker processes)
    jobs: JobManager | None = None


    def pool(self, name: str) -> Pool:
        pool = self.pools.pools.get(name)
        if pool is None:
            raise NotFoundError(f"pool '{name}' does not exist")
        return pool

    def volume(self, volid: str) -> Volume:
        vol = self.pools.lookup(volid)
        if vol is None:
            pool, sep, _ = volid.partition(":")
            if sep and pool not in self.pools.pools:
                raise NotFoundError(f"pool '{pool}' does not exist")
            raise NotFoundError(f"volume '{volid}' does not exist")
        return vol


Handler = Callable[[AdminContext, Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    doc: str
    args: type | None
    returns: str
    handler: Handler


class CommandTable:
    """Commands by name, in the order they were declared (which is the order the docs list them)."""

    def __init__(self) -> None:
        self._rows: dict[str, Command] = {}

    def command(self, name: str, *, args: type | None = None, returns: str = "{}"
                ) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            if name in self._rows:
                raise ValueError(f"admin command {name} declared twice")
            doc = " ".join((fn.__doc__ or "").split())
            self._rows[name] = Command(name, doc, args, returns, fn)
            return fn
        return register

    def __iter__(self) -> Any:
        return iter(self._rows.values())

    def names(self) -> list[str]:
        return list(self._rows)

    def lookup(self, name: str) -> Command:
        cmd = self._rows.get(name)
        if cmd is None:
            raise CommandNotFoundError(f"The command {name} has not been found")
        return cmd

    async def run(self, ctx: AdminContext, name: str, raw: dict[str, Any]) -> Any:
        """Validate and run one command; raises BlockError for the caller to answer with."""
        cmd = self.lookup(name)
        return await cmd.handler(ctx, parse_arguments(cmd.args, raw))

    def schema(self) -> list[dict[str, Any]]:
        """query-qmp-schema: QAPI's SchemaInfo list, with readable type names."""
        types: dict[str, dict[str, Any]] = {}
        entries: list[dict[str, Any]] = []
        for cmd in self:
            arg_type = object_entry(f"{cmd.name}-arguments", cmd.args, types)
            entries.append({"name": cmd.name, "meta-type": "command", "arg-type": arg_type,
                            "ret-type": "any", "allow-oob": False})
        types.setdefault("any", {"name": "any", "meta-type": "builtin", "json-type": "value"})
        return entries + list(types.values())

    def markdown(self) -> str:
        """The command reference of docs/admin.md."""
        out = ["| command | arguments | returns | what it does |", "|---|---|---|---|"]
        for cmd in self:
            args = ", ".join(f"`{n}`{'' if req else '?'}: {kind}"
                             for n, kind, req in describe_arguments(cmd.args))
            out.append(f"| `{cmd.name}` | {args or '(none)'} | {cmd.returns} | {cmd.doc} |")
        return "\n".join(out) + "\n"


TABLE = CommandTable()
command = TABLE.command
