"""Per-process caps on the uploads being received at once and on the bytes they spool to temp files, so
that a crowd of uploads cannot fill the disk or the event loop; a refusal is a 503 with ``Retry-After``."""

from __future__ import annotations

from api.errors import ApiError


class UploadBudget:
    """Slots and spool bytes, taken and given back on the event loop's thread (no lock needed there)."""

    def __init__(self, max_uploads: int, max_bytes: int, retry_after_s: int) -> None:
        self.max_uploads, self.max_bytes, self.retry_after_s = max_uploads, max_bytes, retry_after_s
        self.uploads = 0
        self.bytes = 0

    def busy(self, why: str) -> ApiError:
        return ApiError(503, f"the server is receiving too many uploads ({why}); retry in {self.retry_after_s} s",
                        headers={"Retry-After": str(self.retry_after_s)})

    def admit(self, declared: int | None) -> UploadTicket:
        """A slot and the declared length's bytes up front, before a byte of the body is read."""
        if self.uploads >= self.max_uploads:
            raise self.busy(f"{self.uploads} at once, the cap is ANTIDOTE_MAX_CONCURRENT_UPLOADS="
                             f"{self.max_uploads}")
        ticket = UploadTicket(self)
        self.uploads += 1
        try:
            ticket.reserve(declared or 0)
        except ApiError:
            ticket.release()
            raise
        return ticket


class UploadTicket:
    """One upload's share of the budget; ``spool`` grows it past the declared length (chunked bodies); a
    context manager that gives it all back."""

    def __init__(self, budget: UploadBudget) -> None:
        self.budget = budget
        self.reserved = 0
        self.spooled = 0
        self.released = False

    def reserve(self, n: int) -> None:
        budget = self.budget
        if budget.bytes + n > budget.max_bytes:
            raise budget.busy(f"{budget.bytes} bytes spooled, {n} more would pass ANTIDOTE_MAX_SPOOL_BYTES="
                               f"{budget.max_bytes}")
        budget.bytes += n
        self.reserved += n

    def spool(self, n: int) -> None:
        """``n`` more bytes are about to be written; 503 when they do not fit."""
        self.spooled += n
        if self.spooled > self.reserved:
            self.reserve(self.spooled - self.reserved)

    def __enter__(self) -> UploadTicket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget.uploads -= 1
            self.budget.bytes -= self.reserved
