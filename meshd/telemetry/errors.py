"""Errors of the receipt log."""

from __future__ import annotations

from pathlib import Path


class ReceiptError(Exception):
    code: str = "receipt_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidReceipt(ReceiptError, ValueError):
    """A receipt with a field out of range or of the wrong type (a caller bug)."""

    code = "invalid_receipt"


class ReceiptLogCorrupt(ReceiptError):
    """The writer cannot find where the chain ends: the newest complete line does not parse.

    The writer refuses to start rather than fork the chain; ``meshctl receipts
    verify`` names the problem, and moving the receipt directory aside starts
    a new chain.
    """

    code = "receipt_log_corrupt"

    def __init__(self, message: str, *, path: Path, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


__all__ = ["InvalidReceipt", "ReceiptError", "ReceiptLogCorrupt"]
