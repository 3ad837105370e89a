"""The standalone xenstored's command line: ``python -m blockback.xenstore.server SOCKET``
(also ``python -m vhdtools.xenstored``).

Argument parsing, signals and the one-line error live here; the daemon is
:func:`blockback.xenstore.server.serve`, which takes a :class:`XenStoredOptions` and a stop event.
The options follow C xenstored's quota switches (``-E -S -W -t -A``, defaults in
``blockback.xenstore.store.Quotas``).  Exit codes: 0 after SIGTERM/SIGINT, 2 on a usage error
or a socket that cannot be made.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace

from blockback.errors import ProtocolError
from blockback.xenstore.server import XenStoredOptions, serve
from blockback.xenstore.store import Quotas

from .signals import stop_on_signals

# option, Quotas field, what N counts (for --help)
QUOTA_OPTIONS = (
    ("--quota-nodes", "nodes_per_domain", "nodes a domain may own"),
    ("--quota-entry-size", "entry_size", "bytes in one value"),
    ("--quota-watches", "watches", "watches per connection"),
    ("--quota-transactions", "transactions", "open transactions per connection"),
    ("--quota-perms", "perms_per_node", "entries in one permission list"),
)


def build_parser(prog: str = "python -m vhdtools.xenstored") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A small xenstored on a unix socket (point XENSTORED_PATH at it).",
    )
    parser.add_argument("socket", help="path of the privileged (dom0) socket")
    parser.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="DOMID:PATH",
        help="also accept connections on PATH as unprivileged domain DOMID",
    )
    defaults = Quotas()
    for option, name, what in QUOTA_OPTIONS:
        default = getattr(defaults, name)
        parser.add_argument(
            option,
            dest=name,
            type=int,
            metavar="N",
            default=default,
            help=f"unprivileged domains: at most N {what} (default {default})",
        )
    return parser


def options_from_args(args: argparse.Namespace) -> XenStoredOptions:
    """The daemon's options; ``ValueError`` (one line) for values it cannot take."""
    quotas = replace(Quotas(), **{name: getattr(args, name) for _, name, _ in QUOTA_OPTIONS})
    if min(quotas.nodes_per_domain, quotas.entry_size, quotas.watches, quotas.perms_per_node) < 1:
        raise ValueError("quotas must be at least 1 (transactions at least 0)")
    if quotas.transactions < 0:
        raise ValueError("quotas must be at least 1 (transactions at least 0)")
    domains: dict[int, str] = {}
    for item in args.domain:
        domid, sep, dpath = item.partition(":")
        if not sep or not domid.isdigit():
            raise ValueError(f"--domain wants DOMID:PATH, not {item!r}")
        domains[int(domid)] = dpath
    return XenStoredOptions(path=args.socket, domains=domains, quotas=quotas)


def main(argv: Sequence[str] | None = None, prog: str = "python -m vhdtools.xenstored") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2 with the usage line
    try:
        with stop_on_signals(threading.Event()) as stop:
            serve(options, stop)
    except (OSError, ProtocolError) as exc:
        print(f"xenstored: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
