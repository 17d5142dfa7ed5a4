"""Settings resolved once per invocation, database URLs and engines, logging set-up."""
