"""`edgekit inspect` (owned by the bundle work)."""
