"""The outbox: what makes "accepted" mean "will be delivered or dead-lettered"."""

from mediator.outbox.base import DeadLetter, Outbox, OutboxStats, Pending, StorageError
from mediator.outbox.memory import MemoryOutbox
from mediator.outbox.sqlite import SqliteOutbox

__all__ = ["DeadLetter", "MemoryOutbox", "Outbox", "OutboxStats", "Pending", "SqliteOutbox", "StorageError"]
