"""make fuzz (header_values): an HTTP-date whose year does not fit a C long raised OverflowError out of
``parse_retry_after`` (a 500 for the caller of a webhook outbound's answer); it is unreadable, so None."""

from __future__ import annotations

import time

from adapters.http.codec import parse_retry_after


def test_a_huge_year_is_an_unreadable_retry_after() -> None:
    assert parse_retry_after("Wed, 21 Oct 99999999999999999999999 07:28:00 GMT", time.time()) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 0.0) is not None  # a readable one still is
