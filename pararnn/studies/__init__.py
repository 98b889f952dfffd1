"""Applications built on the engine: `pararnn bench`, `pararnn track` and their tasks.

Nothing in the engine imports this package; it imports the engine like any user would.
"""
