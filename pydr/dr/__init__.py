"""The DR layer: the vault store, replication cycles and recovery points,
failover and what follows it, recovery plans and the retry policy. Above
the endpoints; the CLI is above it."""
