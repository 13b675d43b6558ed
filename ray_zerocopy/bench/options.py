"""The benchmark's command line: its options, checked and resolved (see ``cli.py`` for the run)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ray_zerocopy.bench.approaches import CKPT_PREFIX, OTHERS, OURS_PREFIX
from ray_zerocopy.bench.models import PRESETS, QUANTIZE, ModelSpec, make_spec
from ray_zerocopy.bench.probe import FAST_S

DESCRIPTION = """\
Compare ray_zerocopy with the usual ways of giving N Ray actors one PyTorch model, side by side in one run.

On one model (bert-base or a GPT-2 shape, built from a config with random weights) it runs every
registered transport of ray_zerocopy, plain ray.put(model), Ray's RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1,
the classic numpy recipe, and state-dict files loaded in each actor (torch.load, torch.load(mmap=True),
safetensors). For each it measures the driver's prepare time and memory, the load time in fresh actors
(cold) and again in the same actors (warm), the node's memory with N actors holding the model, and
whether every output matches the original weights; with --device cuda also host-to-device GB/s.
It prints a table (progress goes to stderr) and can write JSON and a PNG chart.
"""
EPILOG = """\
examples:
  python -m ray_zerocopy bench                                 # bert-base, 4 actors, every approach
  python -m ray_zerocopy bench --model gpt2-small --actors 2 --json out.json --png out.png
  python -m ray_zerocopy bench --device cuda --approaches ours,ray_put --together

docs/benchmarks.md lists measured figures with the command that produced each.
"""


@dataclass
class Options:
    args: argparse.Namespace
    spec: ModelSpec
    approaches: list[str]
    actors: int
    device: str
    repeats: int
    fast_repeats: int
    cold_rounds: int



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_zerocopy bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-base", choices=list(PRESETS), help="model shape (default bert-base)")
    p.add_argument("--layers", type=int, help="override the number of transformer layers")
    p.add_argument("--hidden", type=int, help="override the hidden size (a multiple of 64; heads = hidden/64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model's weights (default float32)")
    p.add_argument("--quantize", default="none", choices=list(QUANTIZE),
                   help="quantize the model's linear layers in the driver first (a BERT preset: GPT-2's layers are "
                        "Conv1D); compared with ray_put (each actor its own quantized copy), the only alternative "
                        "that carries quantized tensors")
    p.add_argument("--actors", type=int, default=4, help="actors holding the model at once (default 4)")
    p.add_argument("--backends", default="all", help="comma list of our transports (default: every registered)")
    p.add_argument("--approaches", default="all",
                   help=f"comma list of: ours, {', '.join(OTHERS)}, or rzc:<backend> (default all)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: load onto each actor's GPU")
    p.add_argument("--repeats", type=int, default=3, help="warm loads per actor (default 3)")
    p.add_argument("--cold-rounds", type=int, default=1,
                   help="rounds of --actors fresh actors whose first load is timed (default 1)")
    p.add_argument("--fast-repeats", type=int, default=20,
                   help=f"warm loads per actor for approaches whose loads take under {FAST_S * 1e3:.0f} ms "
                        "(default 20)")
    p.add_argument("--together", action="store_true",
                   help="start every actor's load at the same moment (cold and warm), as a pool does at start-up; "
                        "adds the aggregate GB/s and the time until the last actor is ready")
    p.add_argument("--share-gpu", action="store_true",
                   help="with --device cuda: our transports load with share_gpu=True (actors on one GPU map one copy)")
    p.add_argument("--gpu-copiers", action="store_true",
                   help="with --device cuda: ours prepare with gpu_copiers=True (a copier per GPU, started at "
                        "prepare, fills every load by one DMA; prints how many loads the copiers filled)")
    p.add_argument("--checkpoint", action="store_true",
                   help="also prepare ours from a checkpoint folder (the model saved with save_pretrained, sharded): "
                        "adds rzc-ckpt:<backend> per backend, and from_pretrained_put (from_pretrained + ray.put)")
    p.add_argument("--update", action="store_true",
                   help="measure an update round instead of loads: every actor takes a new version (ours: "
                        "update_model_in_actor; state-dict: ray.put + load_state_dict; redeploy: new actors), "
                        "--repeats rounds each (see bench/update.py)")
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    p.add_argument("--png", dest="png_path", help="draw the chart (PNG) here")
    p.add_argument("--child-workdir", help=argparse.SUPPRESS)  # internal: the second driver for ray_native
    return p


def _select(args: argparse.Namespace) -> list[str]:
    """The approach names to run, in table order: ours first, then the alternatives."""
    from ray_zerocopy.plugins import backend_names

    registered = backend_names()
    backends = registered if args.backends == "all" else [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in registered]
    if unknown:
        raise ValueError(f"--backends: unknown {unknown}; registered here: {registered}")
    ours = [OURS_PREFIX + b for b in backends]
    every = [a for a in OTHERS if args.checkpoint or a != "from_pretrained_put"]
    if args.quantize != "none":  # the others rebuild a dense skeleton, or cannot carry tensor subclasses
        every = ["ray_put"]
        if args.approaches != "all" and (bad := [a.strip() for a in args.approaches.split(",") if a.strip() in OTHERS
                                                 and a.strip() != "ray_put"]):
            raise ValueError(f"--approaches {bad} cannot run a --quantize model; ours and ray_put can")
    wanted = ["ours", *every] if args.approaches == "all" else [a.strip() for a in args.approaches.split(",")]
    chosen: list[str] = []
    for name in wanted:
        if name in ("ours", "rzc"):
            chosen += ours
        elif name.startswith(OURS_PREFIX) and name[len(OURS_PREFIX):] in registered:
            chosen.append(name)
        elif name in OTHERS:
            chosen.append(name)
        elif name:
            raise ValueError(f"--approaches: unknown {name!r}; expected ours, {', '.join(OTHERS)}, "
                             f"or rzc:<backend> with a backend in {registered}")
    if args.checkpoint:  # both routes of ours, and what users do without us, from the same folder
        ckpt = [CKPT_PREFIX + b for b in backends]
        chosen += ckpt + ["from_pretrained_put"]
    elif "from_pretrained_put" in chosen:
        raise ValueError("--approaches from_pretrained_put needs --checkpoint (it loads the saved folder)")
    order = ours + [CKPT_PREFIX + b for b in backends] + [OURS_PREFIX + b for b in registered] + list(OTHERS)
    return sorted(dict.fromkeys(chosen), key=order.index)


def parse_options(argv: list[str]) -> Options:
    """Parse and check the command line (errors name the bad value and the allowed ones)."""
    args = _parser().parse_args(argv)
    if min(args.actors, args.repeats, args.cold_rounds) < 1 or args.fast_repeats < 0:
        raise ValueError(f"--actors, --repeats and --cold-rounds must be >= 1 and --fast-repeats >= 0, got "
                         f"{args.actors}, {args.repeats}, {args.cold_rounds} and {args.fast_repeats}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if (args.share_gpu or args.gpu_copiers) and args.device == "cpu":
        raise ValueError("--share-gpu and --gpu-copiers need --device cuda (CPU weights are shared host memory anyway)")
    spec = make_spec(args.model, args.dtype, args.layers, args.hidden, args.quantize)
    if args.quantize != "none" and args.checkpoint:
        raise ValueError("--quantize and --checkpoint cannot be combined (the checkpoint route is for dense folders)")
    return Options(args, spec, _select(args), args.actors, args.device, args.repeats, args.fast_repeats,
                   args.cold_rounds)


