"""The Alembic side: ``env.py``'s entry point and the caller's-connection adapter."""
