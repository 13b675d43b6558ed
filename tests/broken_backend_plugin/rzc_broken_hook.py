"""A plugin that imports but whose register_backends hook raises."""

from ray_zerocopy import hookimpl


@hookimpl
def register_backends(register):
    raise RuntimeError("this plugin's backend cannot start")
