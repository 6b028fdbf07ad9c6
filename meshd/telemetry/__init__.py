"""Telemetry: hash-chained request receipts, their readers and verification, usage summaries.

See docs/receipts.md; the record schema is docs/receipt.schema.json.
"""

from .errors import InvalidReceipt, ReceiptError, ReceiptLogCorrupt
from .logfiles import HEAD_FILE_NAME, Head, read_head, receipt_files
from .reader import (
    Follower,
    ReceiptFilter,
    ReceiptLine,
    follow,
    format_receipt,
    iter_receipts,
    parse_since,
    read_receipts,
    tail,
)
from .receipts import (
    GENESIS_HASH,
    SCHEMA_VERSION,
    Failover,
    PolicyDecision,
    Receipt,
    Route,
    decode_line,
    encode_line,
)
from .usage import UsageRow, format_usage, summarize
from .verify import ChainProblem, VerifyReport, verify_chain
from .writer import DEFAULT_MAX_FILE_BYTES, ReceiptWriter

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "GENESIS_HASH",
    "HEAD_FILE_NAME",
    "SCHEMA_VERSION",
    "ChainProblem",
    "Failover",
    "Follower",
    "Head",
    "InvalidReceipt",
    "PolicyDecision",
    "Receipt",
    "ReceiptError",
    "ReceiptFilter",
    "ReceiptLine",
    "ReceiptLogCorrupt",
    "ReceiptWriter",
    "Route",
    "UsageRow",
    "VerifyReport",
    "decode_line",
    "encode_line",
    "follow",
    "format_receipt",
    "format_usage",
    "iter_receipts",
    "parse_since",
    "read_head",
    "read_receipts",
    "receipt_files",
    "summarize",
    "tail",
    "verify_chain",
]
