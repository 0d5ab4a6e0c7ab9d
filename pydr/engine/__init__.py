"""The block engine, C-backed: signatures, deltas, undo journals, the
crash-safe apply, resync and the restore of a recovery point. It imports
nothing from the layers above it."""
