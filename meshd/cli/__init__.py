"""Command-line entry points: parse, configure, delegate. No business logic."""
