"""The test suite: every rule of the contract, against a real PostgreSQL."""
