"""The demo (``make demo`` / ``python -m demo``): see __main__.py."""
