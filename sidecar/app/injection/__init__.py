"""Sidecar injection: the template (one source), its Python application and the admission policy made from it."""
