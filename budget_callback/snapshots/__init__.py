"""Snapshot files: format and sizes, schedule, series, directory, writer, reader (no Lightning)."""
