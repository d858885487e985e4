"""Host-side exporters (needs `edgekit[export]`): importable as edgekit.export."""
