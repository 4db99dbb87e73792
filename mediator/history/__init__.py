"""History: the event store, its query and replays (docs/history.md); the unit is ``mediator.history.unit``."""
