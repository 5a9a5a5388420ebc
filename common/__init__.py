"""Shared ground of the API and the dispatchers: settings, database, domain rules and providers."""
