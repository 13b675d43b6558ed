"""Built-in transports of ray_zerocopy, installed as ``ray_zerocopy.backends``.

Each module is an ordinary plugin: it imports only the backend SDK (``ray_zerocopy.backend``, and
``ray_zerocopy.errors``) and implements the ``register_backends`` hook, exactly as a third-party package would.
"""
