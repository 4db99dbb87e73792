"""What one destination does to an event before it is stored for that destination: transform, convert.

Applied when the event is committed (``Router.route``), not by the dispatcher before each send: the
outbox stores an event per delivery row anyway, so a transformed event costs no extra row or blob, and
the stored bytes are then exactly what is sent, on every retry and after a restart, whatever a reload
has done to the route meanwhile (a delivery row names its route, outbound, address and format, not a
version of the route's transform). It also runs a JSONata expression once per delivery, not once per
attempt. A failure dead-letters that one destination, at commit, with the reason.
"""

from __future__ import annotations

from mediator.core.content import parsed
from mediator.core.convert import Converter
from mediator.core.envelope import Envelope
from mediator.core.transform import DataGetter, Transform


class Egress:
    """A destination's transform and format conversion, in that order. Compared by identity: two
    destinations with the same address and different egress get one delivery each."""

    __slots__ = ("convert", "transform")

    def __init__(self, transform: Transform | None, convert: Converter | None) -> None:
        self.transform = transform
        self.convert = convert

    def apply(self, env: Envelope, data: DataGetter) -> Envelope:
        """The event as this destination gets it; raises TransformError."""
        out = self.transform.apply(env, data) if self.transform is not None else env
        if self.convert is not None:
            # A transformed copy is not in the caller's cache (which is keyed by the original event).
            out = self.convert.apply(out, data if out is env else parsed)
        return out
