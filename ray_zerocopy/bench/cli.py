"""``python -m ray_zerocopy bench``: ray_zerocopy against every alternative, side by side, in one run.

On one model (bert-base or GPT-2 shapes built from configs, random weights) it runs every
registered transport of ours, plain ``ray.put(model)``, Ray's own
``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` (in a second driver started with the flag, so its
workers have it too), the classic numpy recipe, and state-dict files loaded in each actor
(``torch.load``, ``torch.load(mmap=True)``, ``safetensors.torch.load_file``). For each it
measures driver prepare time and peak memory, load time in N fresh actors (cold) and again in
the same actors (warm), node memory with the N actors holding the model, each actor's private
memory, and output correctness; with ``--device cuda`` also host-to-device GB/s. It prints a
table (progress goes to stderr), and writes JSON and a PNG chart.

Example:
    python -m ray_zerocopy bench --model bert-base --actors 4 --json out.json --png out.png
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import psutil
import ray
import torch
from ray import cloudpickle

from ray_zerocopy._shm import STORE_MARKER
from ray_zerocopy.bench.approaches import (
    CHECKPOINT,
    CKPT_PREFIX,
    NATIVE,
    OURS_OPTIONS,
    OURS_PREFIX,
    Prepared,
    all_tensors,
    dedupe_tensors,
    get_approach,
    load_torch_file,
)
from ray_zerocopy.bench.models import build_model
from ray_zerocopy.bench.options import Options, parse_options
from ray_zerocopy.bench.probe import FAST_S, BenchActor, DriverPeak, more_loads, object_bytes
from ray_zerocopy.bench.report import draw_png, format_table, summarize, table_head, table_row, write_json

NATIVE_ENV = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """One progress line on stderr, stamped with the seconds since the benchmark started."""
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Context:
    workdir: str
    reference: str  # tensors file of the original weights (correctness reference in every actor)
    model_bytes: int
    num_gpus: float = 0.0


def _start_ray(opts: Options, model_bytes: int) -> float:
    """Start the local Ray of the run; the seconds it took to fault in the store's pages for one model."""
    # one approach's objects at a time (freed before the next); 2.5x leaves room for the classic
    # recipe's duplicated ties and for fragmentation
    store = max(512 * 2**20, int(2.5 * model_bytes) + 256 * 2**20)
    ray.init(address="local", num_cpus=max(8, opts.actors), object_store_memory=store,
             include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    # A fresh store's first put faults its pages in (seconds for a few GB, ten times less once they are
    # resident): done once here, so that no approach pays it for the ones after it.
    t0 = time.perf_counter()
    ray.put(np.zeros(model_bytes, dtype=np.uint8))  # (freed at once; zeros take no driver memory)
    return time.perf_counter() - t0


def _memory_shortfall(name: str, model_bytes: int, actors: int) -> str | None:
    """Why not to run this approach now (it would not fit in the free RAM), or None."""
    copies = get_approach(name).copies
    need = model_bytes * ((actors + 2) if copies else 1 if name.startswith(CKPT_PREFIX) else 2)
    free = psutil.virtual_memory().available
    if need > 0.85 * free:
        return (f"skipped: needs ~{need / 1e9:.1f} GB of RAM ({'one copy per actor' if copies else 'shared copy'}), "
                f"only {free / 1e9:.1f} GB available now; use fewer --actors or a smaller --model")
    return None


def _describe(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the actor's exception
    text = f"{type(cause).__name__}: {cause}".strip()
    return text.splitlines()[0][:300] if text else type(cause).__name__


def _measure_actors(
    name: str, opts: Options, ctx: Context, handle: Any, res: dict[str, Any], files_marker: str | None
) -> None:
    wrapped = [handle]
    cold = _extra_cold_loads(name, opts, ctx, wrapped)  # first, while no actor holds a copy
    actors = _fresh_actors(opts, ctx)
    try:
        infos = ray.get([a.info.remote() for a in actors])
        if name == NATIVE and any(i["native_flag"] != "1" for i in infos):
            raise RuntimeError(f"{NATIVE_ENV} is not set in the actors ({infos}): the measurement would be plain ray.put")
        progress(f"  {name}: cold loads in {opts.actors} fresh actors" + (", together" if opts.args.together else ""))
        device_before = _device_used(actors)
        if opts.args.together:  # all at once, as an actor pool starts
            t0 = time.perf_counter()
            res["cold_s"] = ray.get([a.load.remote(name, wrapped) for a in actors]) + cold
            res["cold_together_s"], res["cold_together_actors"] = time.perf_counter() - t0, len(actors)
        else:
            res["cold_s"] = [ray.get(a.load.remote(name, wrapped)) for a in actors] + cold  # one at a time
        if device_before:  # device memory the N loaded models added, every GPU they use counted once; before
            ray.get([a.settle.remote() for a in actors])  # a forward loads kernels (CUDA context, not weights)
            after = _device_used(actors)
            res["device_added_bytes"] = sum(after[g] - device_before[g] for g in after)
        mem = ray.get([a.run_and_measure.remote(files_marker) for a in actors])
        files = {path: size for m in mem for path, size in m["files"].items()}
        res["mapped_file_bytes"] = sum(files.values())  # page cache the actors' weights live in, once
        res["actor_pss_added_bytes"] = [m["pss"] for m in mem]
        res["actor_uss_added_bytes"] = [m["uss"] for m in mem]
        res["actor_store_pss_bytes"] = [m["store_pss"] for m in mem]
        res["max_abs_diff"] = ray.get(actors[0].check.remote(ctx.reference))
        progress(f"  {name}: {opts.repeats} warm loads in each actor "
                 f"({opts.fast_repeats} if under {FAST_S * 1e3:.0f} ms)")
        if opts.args.together:
            _warm_together(name, opts, actors, wrapped, res)
        else:
            per_actor = [ray.get(a.warm.remote(name, wrapped, opts.repeats, opts.fast_repeats)) for a in actors]
            res["warm_s"] = [t for times in per_actor for t in times]
    finally:
        for a in actors:
            ray.kill(a)


def _warm_together(name: str, opts: Options, actors: list[Any], wrapped: list[Any], res: dict[str, Any]) -> None:
    """Reloads in rounds: every actor drops its model, then all load at the same moment (the time from
    the start until the last is ready is summed over the rounds; the dropping is not in it)."""
    res["warm_s"], res["warm_together_s"], res["warm_together_loads"] = [], 0.0, 0
    rounds = 0
    while more_loads(rounds, res["warm_s"], opts.repeats, opts.fast_repeats):
        ray.get([a.drop.remote() for a in actors])
        t0 = time.perf_counter()
        res["warm_s"] += ray.get([a.load.remote(name, wrapped) for a in actors])
        res["warm_together_s"] += time.perf_counter() - t0
        res["warm_together_loads"] += len(actors)
        rounds += 1


_BenchActor: Any = BenchActor  # (ray.remote made it an ActorClass: .options, .remote)


def _fresh_actors(opts: Options, ctx: Context) -> list[Any]:
    actor_cls = _BenchActor.options(num_gpus=ctx.num_gpus) if ctx.num_gpus else _BenchActor
    return [actor_cls.remote(opts.spec, opts.device, opts.args.share_gpu) for _ in range(opts.actors)]


def _device_used(actors: list[Any]) -> dict[str, int]:
    """Bytes in use on each GPU the actors use, by GPU UUID (empty on the CPU)."""
    return dict(found for found in ray.get([a.device_used.remote() for a in actors]) if found)


def _extra_cold_loads(name: str, opts: Options, ctx: Context, wrapped: list[Any]) -> list[float]:
    """Seconds of the first load in each actor of ``cold_rounds - 1`` rounds of ``actors`` fresh actors
    (a first load happens once per process: more samples need more processes)."""
    times: list[float] = []
    for i in range(opts.cold_rounds - 1):
        progress(f"  {name}: cold loads in {opts.actors} fresh actors (extra round {i + 1})")
        extra = _fresh_actors(opts, ctx)
        try:
            ray.get([a.info.remote() for a in extra])
            times += [ray.get(a.load.remote(name, wrapped)) for a in extra]
        finally:
            for a in extra:
                ray.kill(a)
    return times


def _files_marker(name: str, adir: str) -> str | None:
    """Path substring of the files an approach's actors map their weights from (None: the object store)."""
    if name.startswith(OURS_PREFIX):
        from ray_zerocopy.plugins import get_backend

        marker = get_backend(name[len(OURS_PREFIX):]).shared_memory_marker
        return None if marker == STORE_MARKER else marker
    return adir


def run_approach(name: str, model: torch.nn.Module, opts: Options, ctx: Context) -> dict[str, Any]:
    """Prepare, load in N actors, measure, free. Failures are recorded in the result, never raised."""
    approach = get_approach(name)
    res: dict[str, Any] = {"name": name, "kind": approach.kind, "about": approach.about, "ok": False, "error": None}
    res["error"] = _memory_shortfall(name, ctx.model_bytes, opts.actors)
    if res["error"]:
        progress(f"  {name}: {res['error']}")
        return res
    adir = tempfile.mkdtemp(prefix=name.replace(":", "_") + "-", dir=ctx.workdir)
    prepared: Prepared | None = None
    try:
        with DriverPeak() as peak:
            t0 = time.perf_counter()
            prepared = approach.prepare(model, adir)
            res["prepare_s"] = time.perf_counter() - t0
        res["driver_peak_private_bytes"], res["driver_peak_rss_bytes"] = peak.peak_private, peak.peak_rss
        res["store_bytes"] = object_bytes(prepared.refs)
        res["file_bytes"] = sum(os.path.getsize(f) for f in prepared.files)
        progress(f"  {name}: prepared in {res['prepare_s']:.2f} s")
        _measure_actors(name, opts, ctx, prepared.handle, res, _files_marker(name, adir))
        res["ok"] = True
    except Exception as exc:  # an approach that cannot handle the model is a result, not a crash
        res["error"] = _describe(exc)
        progress(f"  {name}: FAILED {res['error']}")
    finally:
        prepared = None
        if opts.device != "cpu":  # (ours: the model's copiers would hold its objects a few seconds more)
            from ray_zerocopy.gpu_copier import stop_copiers

            res["copier_fills"] = stop_copiers()
            if opts.args.gpu_copiers:
                progress(f"  {name}: its copiers filled {res['copier_fills']} loads")
        gc.collect()
        shutil.rmtree(adir, ignore_errors=True)
    summarize(res, ctx.model_bytes, opts.device)
    # (the table's row now: a run cut short still leaves its finished rows in the log)
    cells = zip(table_head(opts.device, opts.args.together), table_row(res, opts.device, opts.args.together))
    progress(f"  {name}: " + "; ".join(f"{head} {cell}" for head, cell in list(cells)[1:]))
    return res


def _child_argv(opts: Options, workdir: str) -> list[str]:
    a = opts.args
    argv = ["--model", a.model, "--dtype", a.dtype, "--actors", str(a.actors), "--device", a.device,
            "--repeats", str(a.repeats), "--fast-repeats", str(a.fast_repeats), "--cold-rounds", str(a.cold_rounds),
            "--approaches", NATIVE, "--child-workdir", workdir]
    argv += ["--layers", str(a.layers)] if a.layers is not None else []
    return argv + (["--hidden", str(a.hidden)] if a.hidden is not None else [])


def _run_native(opts: Options, ctx: Context) -> dict[str, Any]:
    """Ray reads the flag at import, in the driver and in each worker: run it in a second driver."""
    progress(f"{NATIVE}: starting a second driver with {NATIVE_ENV}=1")
    env = {**os.environ, NATIVE_ENV: "1"}
    cmd = [sys.executable, "-m", "ray_zerocopy", "bench", *_child_argv(opts, ctx.workdir)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        res = {"name": NATIVE, "kind": "ray", "about": get_approach(NATIVE).about, "ok": False,
               "error": f"the {NATIVE_ENV}=1 driver exited with status {proc.returncode} (its stderr is above)"}
        return res


def _child_main(opts: Options) -> int:
    """The second driver: the parent's exact weights, loaded from its tensors file, through ray_native."""
    reference = os.path.join(opts.args.child_workdir, "reference.pt")
    model = load_torch_file(opts.spec, reference, mmap=False)
    model_bytes = sum(t.nbytes for t in dedupe_tensors(model)[0].values())
    _start_ray(opts, model_bytes)
    try:
        res = run_approach(NATIVE, model, opts, Context(opts.args.child_workdir, reference, model_bytes))
    finally:
        ray.shutdown()
    print(json.dumps(res, default=str))
    return 0


def _meta(opts: Options, unique: dict[str, torch.Tensor]) -> dict[str, Any]:
    import transformers

    return {
        "model": opts.spec.name, "family": opts.spec.family, "config": opts.spec.config, "dtype": opts.spec.dtype,
        "quantize": opts.spec.quantize,
        "model_bytes": sum(t.nbytes for t in unique.values()), "tensors": len(unique),
        "actors": opts.actors, "device": opts.device, "repeats": opts.repeats,
        "fast_repeats": opts.fast_repeats, "fast_s": FAST_S, "cold_rounds": opts.cold_rounds,
        "together": opts.args.together, "share_gpu": opts.args.share_gpu, "gpu_copiers": opts.args.gpu_copiers,
        "cpus": psutil.cpu_count(),
        "load_avg_before": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                     "transformers": transformers.__version__},
    }


def run(opts: Options) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every selected approach on one model; return (meta, results in table order)."""
    progress(f"building {opts.spec.name} ({opts.spec.dtype})")
    model = build_model(opts.spec)
    unique = dedupe_tensors(model)[0]
    meta = _meta(opts, unique)
    del unique
    progress(f"model: {meta['model_bytes'] / 1e6:.1f} MB in {meta['tensors']} unique tensors; "
             f"approaches: {', '.join(opts.approaches)}")
    workdir = tempfile.mkdtemp(prefix="rzc-bench-")
    results: dict[str, dict[str, Any]] = {}
    try:
        ctx = Context(workdir, os.path.join(workdir, "reference.pt"), meta["model_bytes"])
        # the reference outputs come from these weights (a quantized model: the model itself, pickled as
        # ray.put pickles it, since quantizing again need not give the same bytes; torch.save's pickler fails
        # on torchao 0.18's tensors: "'functools.partial' object has no attribute '__name__'")
        if opts.spec.quantize == "none":
            torch.save(all_tensors(model), ctx.reference)
        else:
            with open(ctx.reference, "wb") as f:
                cloudpickle.dump(model, f)
        OURS_OPTIONS["gpu_copiers"] = opts.args.gpu_copiers
        if opts.args.checkpoint:
            CHECKPOINT["path"] = os.path.join(workdir, "checkpoint")
            cast(Any, model).save_pretrained(CHECKPOINT["path"], max_shard_size=max(meta["model_bytes"] // 3, 2**20))
            progress(f"saved the checkpoint folder ({len(os.listdir(CHECKPOINT['path']))} files)")
        if NATIVE in opts.approaches:  # before our own Ray starts: one cluster at a time
            results[NATIVE] = _run_native(opts, ctx)
        meta["store_touch_s"] = _start_ray(opts, meta["model_bytes"])
        progress(f"faulted in the object store's pages for one model in {meta['store_touch_s']:.2f} s")
        try:
            meta["pinned_peak_gbps"] = _pinned_peak(opts, ctx) if opts.device != "cpu" else None
            # those that copy the model per actor first, while Ray's store has touched the fewest pages (its
            # tmpfs keeps them after objects go, so the free RAM the memory check sees shrinks as the run goes)
            runs = sorted(opts.approaches, key=lambda name: not get_approach(name).copies)
            for i, name in enumerate(runs):
                if name != NATIVE:
                    progress(f"[{i + 1}/{len(runs)}] {name}")
                    results[name] = run_approach(name, model, opts, ctx)
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["load_avg_after"] = os.getloadavg()
    meta["duration_s"] = time.perf_counter() - _T0
    return meta, [results[name] for name in opts.approaches]


def _pinned_peak(opts: Options, ctx: Context) -> float:
    gpus = ray.cluster_resources().get("GPU", 0)
    if not gpus:
        raise ValueError(f"--device {opts.device}: Ray sees no GPU on this machine; use --device cpu")
    ctx.num_gpus = min(1.0, gpus / opts.actors)
    actor = _BenchActor.options(num_gpus=ctx.num_gpus).remote(opts.spec, opts.device, False)
    try:
        return ray.get(actor.pinned_peak.remote(min(ctx.model_bytes, 2**30)))
    finally:
        ray.kill(actor)


def main(argv: list[str]) -> int:
    """Entry point of ``python -m ray_zerocopy bench``; returns the exit status.

    Args:
        argv: the arguments after ``bench`` (see ``--help``).

    Returns:
        0 when every transport of ours ran (alternatives may fail: that is a result), 1 if one of
        ours failed, 2 on a bad command line.

    Example:
        >>> main(["--model", "tiny-gpt2", "--actors", "2", "--json", "out.json"])  # doctest: +SKIP
    """
    try:
        opts = parse_options(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if opts.args.child_workdir:
        return _child_main(opts)
    if opts.args.update:
        from ray_zerocopy.bench.update import format_updates, run_updates

        model_bytes, updates = run_updates(opts.spec, opts.actors, opts.repeats, progress=progress,
                                          device=opts.device)
        print(format_updates(updates, model_bytes, opts.actors))
        if opts.args.json_path:
            with open(opts.args.json_path, "w") as f:
                json.dump({"model_bytes": model_bytes, "actors": opts.actors, "updates": updates}, f, indent=1)
        return 0
    meta, results = run(opts)
    print(format_table(meta, results))
    if opts.args.json_path:
        write_json(opts.args.json_path, meta, results)
    if opts.args.png_path:
        draw_png(opts.args.png_path, meta, results)
    return 1 if any(r["kind"] == "ours" and not r["ok"] for r in results) else 0
