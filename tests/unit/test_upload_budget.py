"""The per-process upload budget: slots, bytes reserved up front and grown as they arrive, all given back."""

from __future__ import annotations

import pytest

from api.errors import ApiError
from api.upload_budget import UploadBudget


def test_slots_and_bytes_are_taken_and_given_back() -> None:
    budget = UploadBudget(max_uploads=2, max_bytes=1000, retry_after_s=4)
    a = budget.admit(600)
    with pytest.raises(ApiError) as refused:
        budget.admit(500)  # 600 + 500 > 1000
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "4"}
    assert (budget.uploads, budget.bytes) == (1, 600)  # the refused one took nothing
    b = budget.admit(None)  # chunked: nothing known up front
    with pytest.raises(ApiError, match="ANTIDOTE_MAX_CONCURRENT_UPLOADS=2"):
        budget.admit(0)
    b.spool(300)
    with pytest.raises(ApiError, match="ANTIDOTE_MAX_SPOOL_BYTES=1000"):
        b.spool(200)
    a.spool(600)  # within its declared share: nothing more taken
    assert budget.bytes == 900
    for ticket in (a, b, b):
        ticket.release()
    assert (budget.uploads, budget.bytes) == (0, 0)
