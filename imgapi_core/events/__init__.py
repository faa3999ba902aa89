"""Knowing when work is done: the event log followed by each API process (hub), the Redis
notification that wakes it when another process commits, waiting for an image, and SSE framing.

Every event is a row the store writes in the transaction of the change it describes (see
`imgapi_core.store.EVENT_TYPES`); nothing here polls per client.
"""
