"""Replication cycles: the API callers use (Vault.replicate, failover's
last cycle, reprotect's first). A cycle replicates every disk of one or
more items and ends in a recovery point per item; the items of one call
share its id. The driver is pydr.dr.cycle (units, executors, per-item
outcomes); the captures are pydr.dr.stepcapture (a replica and its undo
steps) and pydr.dr.chunkcapture (chunks in an object store); the checks and
records of the vault's side are pydr.dr.cyclerecord.
"""

from .cycle import LocalExecutor  # noqa: F401
# re-exported explicitly (`as`): pydr.dr.vault calls them, type-checked
from .cycle import replicate as replicate, replicate_with_retry as replicate_with_retry
from .cyclerecord import (RESYNC_THRESHOLD, CycleResult, ItemOutcome,  # noqa: F401
                          broken_chain, check_can_replicate, check_hooks, check_not_stuck,
                          check_one_writer, drop_cache, mark_resync_required, owner_of,
                          record_point, record_steps)
