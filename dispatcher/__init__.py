"""The dispatcher: a standalone process that sends queued messages through the providers.

Run any number of replicas against one database: ``python -m dispatcher``.
"""
