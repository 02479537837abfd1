"""What travels and where it lands: records, the worker-side forwarder, the driver-side actor, sinks.

The event vocabulary and the callback registry belong to the engine (``trainers.events``,
``trainers.registry``): the trainer fires events without knowing where they go.
"""
