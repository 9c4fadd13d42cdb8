"""PostgreSQL 15's on-disk and WAL constants, in one place.

The WAL decoder and the parsers of record bodies must agree bit for bit with the server
that wrote the WAL. Every value here is copied from the PostgreSQL 15 headers named next
to it (``/usr/include/postgresql/15/server``); later versions renumbered some of them
(block-image compression bits, the page magic), so do not "update" them from newer sources.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

# -- sizes (pg_config.h, pg_config_manual.h) ---------------------------------------------
BLCKSZ: Final = 8192
XLOG_BLCKSZ: Final = 8192
WAL_SEGMENT_SIZE: Final = 16 * 1024 * 1024  # the initdb default; xlp_seg_size is checked
MAXIMUM_ALIGNOF: Final = 8


def maxalign(n: int) -> int:
    """Round up to PostgreSQL's MAXALIGN (8 bytes on every 64-bit platform)."""
    return (n + MAXIMUM_ALIGNOF - 1) & ~(MAXIMUM_ALIGNOF - 1)


# -- WAL pages (access/xlog_internal.h) ---------------------------------------------------
XLOG_PAGE_MAGIC: Final = 0xD110  # PostgreSQL 15
SIZE_OF_XLOG_SHORT_PHD: Final = 24  # MAXALIGN(sizeof(XLogPageHeaderData))
SIZE_OF_XLOG_LONG_PHD: Final = 40  # MAXALIGN(sizeof(XLogLongPageHeaderData))

XLP_FIRST_IS_CONTRECORD: Final = 0x0001
XLP_LONG_HEADER: Final = 0x0002
XLP_BKP_REMOVABLE: Final = 0x0004
XLP_FIRST_IS_OVERWRITE_CONTRECORD: Final = 0x0008
XLP_ALL_FLAGS: Final = 0x000F

# -- WAL records (access/xlogrecord.h) ------------------------------------------------------
SIZE_OF_XLOG_RECORD: Final = 24  # offsetof(XLogRecord, xl_crc) + sizeof(pg_crc32c)
XL_CRC_OFFSET: Final = 20

XLR_INFO_MASK: Final = 0x0F
XLR_RMGR_INFO_MASK: Final = 0xF0
XLR_SPECIAL_REL_UPDATE: Final = 0x01
XLR_CHECK_CONSISTENCY: Final = 0x02

XLR_MAX_BLOCK_ID: Final = 32
XLR_BLOCK_ID_DATA_SHORT: Final = 255
XLR_BLOCK_ID_DATA_LONG: Final = 254
XLR_BLOCK_ID_ORIGIN: Final = 253
XLR_BLOCK_ID_TOPLEVEL_XID: Final = 252

BKPBLOCK_FORK_MASK: Final = 0x0F
BKPBLOCK_FLAG_MASK: Final = 0xF0
BKPBLOCK_HAS_IMAGE: Final = 0x10
BKPBLOCK_HAS_DATA: Final = 0x20
BKPBLOCK_WILL_INIT: Final = 0x40
BKPBLOCK_SAME_REL: Final = 0x80

BKPIMAGE_HAS_HOLE: Final = 0x01
BKPIMAGE_APPLY: Final = 0x02
BKPIMAGE_COMPRESS_PGLZ: Final = 0x04
BKPIMAGE_COMPRESS_LZ4: Final = 0x08
BKPIMAGE_COMPRESS_ZSTD: Final = 0x10
BKPIMAGE_COMPRESS_MASK: Final = (
    BKPIMAGE_COMPRESS_PGLZ | BKPIMAGE_COMPRESS_LZ4 | BKPIMAGE_COMPRESS_ZSTD
)

# -- data pages (storage/bufpage.h) -------------------------------------------------------
SIZE_OF_PAGE_HEADER_DATA: Final = 24
PG_PAGE_LAYOUT_VERSION: Final = 4

# -- relation forks (common/relpath.c forkNames) ------------------------------------------
FORK_NAMES: Final = ("main", "fsm", "vm", "init")


class RmgrId(IntEnum):
    """Resource-manager ids (access/rmgrlist.h); the order of that list is the id."""

    XLOG = 0
    XACT = 1
    SMGR = 2
    CLOG = 3
    DBASE = 4
    TBLSPC = 5
    MULTIXACT = 6
    RELMAP = 7
    STANDBY = 8
    HEAP2 = 9
    HEAP = 10
    BTREE = 11
    HASH = 12
    GIN = 13
    GIST = 14
    SEQ = 15
    SPGIST = 16
    BRIN = 17
    COMMIT_TS = 18
    REPLORIGIN = 19
    GENERIC = 20
    LOGICALMSG = 21


# The names pg_waldump prints in its ``rmgr:`` column (second field of PG_RMGR).
RMGR_NAMES: Final[dict[int, str]] = {
    RmgrId.XLOG: "XLOG",
    RmgrId.XACT: "Transaction",
    RmgrId.SMGR: "Storage",
    RmgrId.CLOG: "CLOG",
    RmgrId.DBASE: "Database",
    RmgrId.TBLSPC: "Tablespace",
    RmgrId.MULTIXACT: "MultiXact",
    RmgrId.RELMAP: "RelMap",
    RmgrId.STANDBY: "Standby",
    RmgrId.HEAP2: "Heap2",
    RmgrId.HEAP: "Heap",
    RmgrId.BTREE: "Btree",
    RmgrId.HASH: "Hash",
    RmgrId.GIN: "Gin",
    RmgrId.GIST: "Gist",
    RmgrId.SEQ: "Sequence",
    RmgrId.SPGIST: "SPGist",
    RmgrId.BRIN: "BRIN",
    RmgrId.COMMIT_TS: "CommitTs",
    RmgrId.REPLORIGIN: "ReplicationOrigin",
    RmgrId.GENERIC: "Generic",
    RmgrId.LOGICALMSG: "LogicalMessage",
}
RM_MIN_CUSTOM_ID: Final = 128  # ids 128..255 belong to extensions (access/rmgr.h)


def rmgr_name(rmid: int) -> str:
    """The resource manager's name as pg_waldump prints it (``custom###`` for extensions)."""
    name = RMGR_NAMES.get(rmid)
    if name is not None:
        return name
    if rmid >= RM_MIN_CUSTOM_ID:
        return f"custom{rmid:03d}"
    return f"unknown{rmid}"


# -- RM_XLOG_ID (catalog/pg_control.h) ----------------------------------------------------
XLOG_CHECKPOINT_SHUTDOWN: Final = 0x00
XLOG_CHECKPOINT_ONLINE: Final = 0x10
XLOG_NOOP: Final = 0x20
XLOG_NEXTOID: Final = 0x30
XLOG_SWITCH: Final = 0x40
XLOG_BACKUP_END: Final = 0x50
XLOG_PARAMETER_CHANGE: Final = 0x60
XLOG_RESTORE_POINT: Final = 0x70
XLOG_FPW_CHANGE: Final = 0x80
XLOG_END_OF_RECOVERY: Final = 0x90
XLOG_FPI_FOR_HINT: Final = 0xA0
XLOG_FPI: Final = 0xB0
XLOG_OVERWRITE_CONTRECORD: Final = 0xD0

# -- RM_XACT_ID (access/xact.h) -----------------------------------------------------------
XLOG_XACT_COMMIT: Final = 0x00
XLOG_XACT_PREPARE: Final = 0x10
XLOG_XACT_ABORT: Final = 0x20
XLOG_XACT_COMMIT_PREPARED: Final = 0x30
XLOG_XACT_ABORT_PREPARED: Final = 0x40
XLOG_XACT_ASSIGNMENT: Final = 0x50
XLOG_XACT_INVALIDATIONS: Final = 0x60
XLOG_XACT_OPMASK: Final = 0x70
XLOG_XACT_HAS_INFO: Final = 0x80

XACT_XINFO_HAS_DBINFO: Final = 1 << 0
XACT_XINFO_HAS_SUBXACTS: Final = 1 << 1
XACT_XINFO_HAS_RELFILENODES: Final = 1 << 2
XACT_XINFO_HAS_INVALS: Final = 1 << 3
XACT_XINFO_HAS_TWOPHASE: Final = 1 << 4
XACT_XINFO_HAS_ORIGIN: Final = 1 << 5
XACT_XINFO_HAS_AE_LOCKS: Final = 1 << 6
XACT_XINFO_HAS_GID: Final = 1 << 7
XACT_XINFO_HAS_DROPPED_STATS: Final = 1 << 8

# pg_xact status values (access/clog.h)
TRANSACTION_STATUS_IN_PROGRESS: Final = 0x00
TRANSACTION_STATUS_COMMITTED: Final = 0x01
TRANSACTION_STATUS_ABORTED: Final = 0x02
TRANSACTION_STATUS_SUB_COMMITTED: Final = 0x03

# -- RM_SMGR_ID (catalog/storage_xlog.h) --------------------------------------------------
XLOG_SMGR_CREATE: Final = 0x10
XLOG_SMGR_TRUNCATE: Final = 0x20
SMGR_TRUNCATE_HEAP: Final = 0x0001
SMGR_TRUNCATE_VM: Final = 0x0002
SMGR_TRUNCATE_FSM: Final = 0x0004
SMGR_TRUNCATE_ALL: Final = SMGR_TRUNCATE_HEAP | SMGR_TRUNCATE_VM | SMGR_TRUNCATE_FSM

# -- RM_CLOG_ID (access/clog.h) -----------------------------------------------------------
CLOG_ZEROPAGE: Final = 0x00
CLOG_TRUNCATE: Final = 0x10

# -- RM_DBASE_ID (commands/dbcommands_xlog.h) ---------------------------------------------
XLOG_DBASE_CREATE_FILE_COPY: Final = 0x00
XLOG_DBASE_CREATE_WAL_LOG: Final = 0x10
XLOG_DBASE_DROP: Final = 0x20

# -- RM_TBLSPC_ID (commands/tablespace.h) -------------------------------------------------
XLOG_TBLSPC_CREATE: Final = 0x00
XLOG_TBLSPC_DROP: Final = 0x10

# -- RM_MULTIXACT_ID (access/multixact.h) -------------------------------------------------
XLOG_MULTIXACT_ZERO_OFF_PAGE: Final = 0x00
XLOG_MULTIXACT_ZERO_MEM_PAGE: Final = 0x10
XLOG_MULTIXACT_CREATE_ID: Final = 0x20
XLOG_MULTIXACT_TRUNCATE_ID: Final = 0x30


class MultiXactStatus(IntEnum):
    FOR_KEY_SHARE = 0x00
    FOR_SHARE = 0x01
    FOR_NO_KEY_UPDATE = 0x02
    FOR_UPDATE = 0x03
    NO_KEY_UPDATE = 0x04
    UPDATE = 0x05


# -- RM_GIST_ID (access/gistxlog.h, access/gist.h) ----------------------------------------
XLOG_GIST_PAGE_UPDATE: Final = 0x00
XLOG_GIST_PAGE_SPLIT: Final = 0x30
#: GISTPageOpaqueData.flags: the page's right sibling has no downlink in the parent yet.
F_FOLLOW_RIGHT: Final = 1 << 3

# -- RM_COMMIT_TS_ID (access/commit_ts.h) -------------------------------------------------
COMMIT_TS_ZEROPAGE: Final = 0x00
COMMIT_TS_TRUNCATE: Final = 0x10

# -- RM_REPLORIGIN_ID (replication/origin.h) ----------------------------------------------
XLOG_REPLORIGIN_SET: Final = 0x00
XLOG_REPLORIGIN_DROP: Final = 0x10

# -- RM_RELMAP_ID (utils/relmapper.h) -----------------------------------------------------
XLOG_RELMAP_UPDATE: Final = 0x00

# -- RM_STANDBY_ID (storage/standbydefs.h) ------------------------------------------------
XLOG_STANDBY_LOCK: Final = 0x00
XLOG_RUNNING_XACTS: Final = 0x10
XLOG_INVALIDATIONS: Final = 0x20

# -- RM_HEAP_ID / RM_HEAP2_ID (access/heapam_xlog.h) --------------------------------------
XLOG_HEAP_INSERT: Final = 0x00
XLOG_HEAP_DELETE: Final = 0x10
XLOG_HEAP_UPDATE: Final = 0x20
XLOG_HEAP_TRUNCATE: Final = 0x30
XLOG_HEAP_HOT_UPDATE: Final = 0x40
XLOG_HEAP_CONFIRM: Final = 0x50
XLOG_HEAP_LOCK: Final = 0x60
XLOG_HEAP_INPLACE: Final = 0x70
XLOG_HEAP_OPMASK: Final = 0x70
XLOG_HEAP_INIT_PAGE: Final = 0x80

XLOG_HEAP2_REWRITE: Final = 0x00
XLOG_HEAP2_PRUNE: Final = 0x10
XLOG_HEAP2_VACUUM: Final = 0x20
XLOG_HEAP2_FREEZE_PAGE: Final = 0x30
XLOG_HEAP2_VISIBLE: Final = 0x40
XLOG_HEAP2_MULTI_INSERT: Final = 0x50
XLOG_HEAP2_LOCK_UPDATED: Final = 0x60
XLOG_HEAP2_NEW_CID: Final = 0x70

XLH_INSERT_ALL_VISIBLE_CLEARED: Final = 1 << 0
XLH_INSERT_LAST_IN_MULTI: Final = 1 << 1
XLH_INSERT_IS_SPECULATIVE: Final = 1 << 2
XLH_INSERT_CONTAINS_NEW_TUPLE: Final = 1 << 3
XLH_INSERT_ON_TOAST_RELATION: Final = 1 << 4
XLH_INSERT_ALL_FROZEN_SET: Final = 1 << 5

XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED: Final = 1 << 0
XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED: Final = 1 << 1
XLH_UPDATE_CONTAINS_OLD_TUPLE: Final = 1 << 2
XLH_UPDATE_CONTAINS_OLD_KEY: Final = 1 << 3
XLH_UPDATE_CONTAINS_NEW_TUPLE: Final = 1 << 4
XLH_UPDATE_PREFIX_FROM_OLD: Final = 1 << 5
XLH_UPDATE_SUFFIX_FROM_OLD: Final = 1 << 6

XLH_DELETE_ALL_VISIBLE_CLEARED: Final = 1 << 0
XLH_DELETE_CONTAINS_OLD_TUPLE: Final = 1 << 1
XLH_DELETE_CONTAINS_OLD_KEY: Final = 1 << 2
XLH_DELETE_IS_SUPER: Final = 1 << 3
XLH_DELETE_IS_PARTITION_MOVE: Final = 1 << 4

XLH_LOCK_ALL_FROZEN_CLEARED: Final = 0x01  # xl_heap_lock and xl_heap_lock_updated

# visibility-map bits (access/visibilitymapdefs.h)
VISIBILITYMAP_ALL_VISIBLE: Final = 0x01
VISIBILITYMAP_ALL_FROZEN: Final = 0x02

# -- record names as pg_waldump prints them (the *_identify functions) --------------------
_XLOG_NAMES: Final = {
    XLOG_CHECKPOINT_SHUTDOWN: "CHECKPOINT_SHUTDOWN",
    XLOG_CHECKPOINT_ONLINE: "CHECKPOINT_ONLINE",
    XLOG_NOOP: "NOOP",
    XLOG_NEXTOID: "NEXTOID",
    XLOG_SWITCH: "SWITCH",
    XLOG_BACKUP_END: "BACKUP_END",
    XLOG_PARAMETER_CHANGE: "PARAMETER_CHANGE",
    XLOG_RESTORE_POINT: "RESTORE_POINT",
    XLOG_FPW_CHANGE: "FPW_CHANGE",
    XLOG_END_OF_RECOVERY: "END_OF_RECOVERY",
    XLOG_OVERWRITE_CONTRECORD: "OVERWRITE_CONTRECORD",
    XLOG_FPI: "FPI",
    XLOG_FPI_FOR_HINT: "FPI_FOR_HINT",
}
_XACT_NAMES: Final = {
    XLOG_XACT_COMMIT: "COMMIT",
    XLOG_XACT_PREPARE: "PREPARE",
    XLOG_XACT_ABORT: "ABORT",
    XLOG_XACT_COMMIT_PREPARED: "COMMIT_PREPARED",
    XLOG_XACT_ABORT_PREPARED: "ABORT_PREPARED",
    XLOG_XACT_ASSIGNMENT: "ASSIGNMENT",
    XLOG_XACT_INVALIDATIONS: "INVALIDATION",
}
_HEAP_NAMES: Final = {
    XLOG_HEAP_INSERT: "INSERT",
    XLOG_HEAP_DELETE: "DELETE",
    XLOG_HEAP_UPDATE: "UPDATE",
    XLOG_HEAP_TRUNCATE: "TRUNCATE",
    XLOG_HEAP_HOT_UPDATE: "HOT_UPDATE",
    XLOG_HEAP_CONFIRM: "HEAP_CONFIRM",
    XLOG_HEAP_LOCK: "LOCK",
    XLOG_HEAP_INPLACE: "INPLACE",
}
_HEAP2_NAMES: Final = {
    XLOG_HEAP2_REWRITE: "REWRITE",
    XLOG_HEAP2_PRUNE: "PRUNE",
    XLOG_HEAP2_VACUUM: "VACUUM",
    XLOG_HEAP2_FREEZE_PAGE: "FREEZE_PAGE",
    XLOG_HEAP2_VISIBLE: "VISIBLE",
    XLOG_HEAP2_MULTI_INSERT: "MULTI_INSERT",
    XLOG_HEAP2_LOCK_UPDATED: "LOCK_UPDATED",
    XLOG_HEAP2_NEW_CID: "NEW_CID",
}
_SIMPLE_NAMES: Final[dict[int, dict[int, str]]] = {
    RmgrId.XLOG: _XLOG_NAMES,
    RmgrId.SMGR: {XLOG_SMGR_CREATE: "CREATE", XLOG_SMGR_TRUNCATE: "TRUNCATE"},
    RmgrId.CLOG: {CLOG_ZEROPAGE: "ZEROPAGE", CLOG_TRUNCATE: "TRUNCATE"},
    RmgrId.DBASE: {
        XLOG_DBASE_CREATE_FILE_COPY: "CREATE_FILE_COPY",
        XLOG_DBASE_CREATE_WAL_LOG: "CREATE_WAL_LOG",
        XLOG_DBASE_DROP: "DROP",
    },
    RmgrId.TBLSPC: {XLOG_TBLSPC_CREATE: "CREATE", XLOG_TBLSPC_DROP: "DROP"},
    RmgrId.MULTIXACT: {
        XLOG_MULTIXACT_ZERO_OFF_PAGE: "ZERO_OFF_PAGE",
        XLOG_MULTIXACT_ZERO_MEM_PAGE: "ZERO_MEM_PAGE",
        XLOG_MULTIXACT_CREATE_ID: "CREATE_ID",
        XLOG_MULTIXACT_TRUNCATE_ID: "TRUNCATE_ID",
    },
    RmgrId.RELMAP: {XLOG_RELMAP_UPDATE: "UPDATE"},
    RmgrId.GIST: {XLOG_GIST_PAGE_UPDATE: "PAGE_UPDATE", XLOG_GIST_PAGE_SPLIT: "PAGE_SPLIT"},
    RmgrId.COMMIT_TS: {COMMIT_TS_ZEROPAGE: "ZEROPAGE", COMMIT_TS_TRUNCATE: "TRUNCATE"},
    RmgrId.REPLORIGIN: {XLOG_REPLORIGIN_SET: "SET", XLOG_REPLORIGIN_DROP: "DROP"},
    RmgrId.STANDBY: {
        XLOG_STANDBY_LOCK: "LOCK",
        XLOG_RUNNING_XACTS: "RUNNING_XACTS",
        XLOG_INVALIDATIONS: "INVALIDATIONS",
    },
}


def record_name(rmid: int, info: int) -> str | None:
    """The record kind as pg_waldump's ``desc:`` begins, for the resource managers that
    ingest cares about; ``None`` for the others (index AMs, sequences, ...)."""
    if rmid == RmgrId.XACT:
        return _XACT_NAMES.get(info & XLOG_XACT_OPMASK)
    if rmid == RmgrId.HEAP:
        name = _HEAP_NAMES.get(info & XLOG_HEAP_OPMASK)
        if name is not None and info & XLOG_HEAP_INIT_PAGE:
            name += "+INIT"
        return name
    if rmid == RmgrId.HEAP2:
        name = _HEAP2_NAMES.get(info & XLOG_HEAP_OPMASK)
        if name is not None and info & XLOG_HEAP_INIT_PAGE:
            name += "+INIT"
        return name
    table = _SIMPLE_NAMES.get(rmid)
    if table is None:
        return None
    return table.get(info & XLR_RMGR_INFO_MASK)
