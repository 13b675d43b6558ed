"""``python -m ray_zerocopy bench``: ray_zerocopy against every alternative, side by side (see ``cli.py``).

Not part of the runtime: nothing outside this subpackage imports it (``__main__`` does, on ``bench``).
``options`` parses the command line, ``cli`` runs it, ``approaches`` holds the models and the ways to load them,
``probe`` the actor that loads and times and the memory probes, ``report`` the table, JSON and chart.
"""

from __future__ import annotations

from ray_zerocopy.bench.cli import main, parse_options

__all__ = ["main", "parse_options"]
