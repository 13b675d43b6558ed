"""Command line: ``python -m ray_zerocopy backends`` lists transports; ``... bench`` runs the benchmark."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
ray_zerocopy: many Ray actors on a node share one copy of a PyTorch model's weights.

commands:
  backends   list the weight transports installed here (built-in and plugins), and broken plugins
  bench      compare ray_zerocopy with ray.put, Ray's zero-copy flag and loading from files
"""


def _list_backends() -> int:
    import warnings

    from ray_zerocopy.plugins import DISABLE_AUTOLOAD_ENV, PluginLoadWarning, backend_infos, broken_plugins, tensor_adapters

    with warnings.catch_warnings():  # listed below instead
        warnings.simplefilter("ignore", PluginLoadWarning)
        infos = backend_infos()
        adapters = [a.name for a in tensor_adapters()]
        broken = broken_plugins()
    rows = [("backend", "plugin", "distribution")] + [(i.name, i.plugin, i.distribution) for i in infos.values()]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if broken:
        print(f"\nbroken plugin(s), skipped (fix or uninstall them, or set {DISABLE_AUTOLOAD_ENV}=1):")
        for b in broken:
            where = f" (entry point {b.plugin} = {b.target})" if b.target else ""
            print(f"  BROKEN  {b.plugin}  {b.distribution}{where}: {b.error}")
    print(f"\ntensor adapters (quantized weights), tried in this order: {', '.join(adapters)}")
    print(f"\n{len(infos)} backend(s); set {DISABLE_AUTOLOAD_ENV}=1 to skip third-party entry points.")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser answers `bench --help` with the bench's options
        from ray_zerocopy.bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m ray_zerocopy", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["backends", "bench"],
                        help="backends: list the installed weight transports; bench: run the benchmark "
                             "(python -m ray_zerocopy bench --help lists its options)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "backends":
        if rest:
            parser.error(f"'backends' takes no arguments, got {rest}")
        return _list_backends()
    from ray_zerocopy.bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
