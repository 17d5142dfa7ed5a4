"""The pure parts: revision graph, planning, states, environments, errors; no database."""
