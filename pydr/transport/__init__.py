"""The wire: pydr's protocol (docs/PROTOCOL.md), the two-level exchange,
the roles of a resync, several streams for long links, the client of a
host and ``pydr serve``. It imports only the engine."""
