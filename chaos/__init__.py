"""Chaos runs against the real processes (``python -m chaos``): crashes, pauses, a database outage, time zones.

Each scenario starts the API and dispatchers as child processes on a scratch database, breaks something on
purpose, lets the service recover by itself, and then checks the invariants the README promises against the
rows, the files and the logs.  Any broken invariant makes the run exit non-zero.
"""
