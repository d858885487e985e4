"""`edgekit make-checkpoint`."""
