"""Built-in transports of ray_zerocopy, installed as ``ray_zerocopy.backends``.

Each module is an ordinary plugin: it imports only public names of ray_zerocopy and
implements the ``register_backends`` hook, exactly as a third-party package would.
"""
