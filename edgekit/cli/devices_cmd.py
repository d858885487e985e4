"""`edgekit devices` and `edgekit plan` (owned by the profiles/plan work)."""
