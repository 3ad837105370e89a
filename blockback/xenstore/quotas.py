"""XenStore quotas: C xenstored's limits for unprivileged domains and their defaults.

Source: Xen 4.17 ``tools/xenstore/xenstored_core.c`` (``quota_nb_entry_per_domain``,
``quota_max_entry_size``, ``quota_nb_watch_per_domain``, ``quota_max_transaction``,
``quota_nb_perms_per_node``; command-line switches ``-E -S -W -t -A``) and XSA-349 for the
bounded outgoing event queues (``EVENT_QUEUE_BYTES``, used by ``connection.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Quotas for unprivileged connections (C xenstored defaults) and for everyone.
QUOTA_NODES_PER_DOMAIN = 1000
QUOTA_ENTRY_SIZE = 2048
QUOTA_WATCHES = 128
QUOTA_TRANSACTIONS = 10
QUOTA_PERMS_PER_NODE = 5
PRIV_QUOTA_WATCHES = 4096
PRIV_QUOTA_TRANSACTIONS = 256
EVENT_QUEUE_BYTES = 256 * 1024  # beyond this, events are remembered per watch instead


@dataclass(frozen=True, slots=True)
class Quotas:
    """Limits for unprivileged domains (C xenstored's ``-E -S -W -t -A`` options and defaults),
    and the watch and transaction limits that also bound dom0's connections."""

    nodes_per_domain: int = QUOTA_NODES_PER_DOMAIN
    entry_size: int = QUOTA_ENTRY_SIZE
    watches: int = QUOTA_WATCHES
    transactions: int = QUOTA_TRANSACTIONS  # open at once, per connection
    perms_per_node: int = QUOTA_PERMS_PER_NODE
    privileged_watches: int = PRIV_QUOTA_WATCHES
    privileged_transactions: int = PRIV_QUOTA_TRANSACTIONS
