"""Measurement tools of the benchmark: the actor that loads and times, and the memory probes.

Memory is read from ``/proc`` (Linux). The object store's shared mapping (``/dev/shm/plasma*``)
is left out of an actor's PSS/USS, because its bytes are counted once as object-store bytes;
file mappings (``torch.load(mmap=True)``) stay in, shared between the actors that map them.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import pickle
import statistics
import threading
import time
import warnings
from typing import Any, cast

import ray
import torch

from ray_zerocopy import _procmaps
from ray_zerocopy._shm import STORE_MARKER
from ray_zerocopy.bench.approaches import get_approach, load_torch_file
from ray_zerocopy.bench.models import ModelSpec, build_model, quantizer_module, run_model, sample_input


def _trim_heap() -> None:
    """Return freed heap to the system before memory is read: glibc keeps a forward pass's freed temporaries (a
    quantized layer dequantizes its weight into one), which would count as memory the model holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def process_memory(files_marker: str | None = None) -> dict[str, Any]:
    """This process's PSS and USS in bytes outside the object store's mapping (``store_pss``: inside it).

    Mappings of files whose path contains ``files_marker`` (the weights of an mmap loader) are left
    out too and returned as ``files`` (path -> size): their page cache is counted once per node.
    """
    pss = uss = store = 0
    files: dict[str, int] = {}
    skip = in_store = False
    with open("/proc/self/smaps") as f:
        for line in f:
            mapping = _procmaps.parse(line)
            if mapping is None:  # a field line ("Pss:     12 kB")
                key, _, rest = line.partition(":")
                if key == "Pss":
                    kb = int(rest.split()[0]) * 1024
                    store += kb if in_store else 0
                    pss += 0 if skip else kb
                elif key in ("Private_Clean", "Private_Dirty") and not skip:
                    uss += int(rest.split()[0]) * 1024
            else:  # a mapping header ("7f..-7f.. rw-s 0000 00:1b 46  /dev/shm/plasmaX (deleted)")
                in_store = STORE_MARKER in line
                path = mapping.path  # (anonymous mappings have none)
                in_files = bool(files_marker and files_marker in path) and not in_store
                if in_files:
                    path = path.removesuffix(" (deleted)")
                    files[path] = os.path.getsize(path) if os.path.exists(path) else 0
                skip = in_store or in_files
    return {"pss": pss, "uss": uss, "store_pss": store, "files": files}


def _statm() -> tuple[int, int]:
    """(resident, shared) bytes of this process; shared = file-backed + shmem pages."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, int(fields[2]) * page


class DriverPeak:
    """Peak private (anonymous) memory the driver adds inside the ``with`` block, and peak RSS.

    The kernel's exact high-water mark (VmHWM, reset through ``/proc/self/clear_refs``) includes
    pages written into the object store and into files; a 1 ms sampler tracks the private part.
    Both private estimates are lower bounds of the true private peak; the larger is reported.
    """

    def __enter__(self) -> DriverPeak:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._hwm_ok = True
        except OSError:
            self._hwm_ok = False
        rss, shared = _statm()
        self.rss0, self.anon0 = rss, rss - shared
        self._max_anon, self._max_shared, self._max_rss = rss - shared, shared, rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            rss, shared = _statm()
            self._max_anon = max(self._max_anon, rss - shared)
            self._max_shared = max(self._max_shared, shared)
            self._max_rss = max(self._max_rss, rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_once()
        hwm = self._max_rss
        if self._hwm_ok:
            with open("/proc/self/status") as f:
                hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        self.peak_rss = max(hwm, self._max_rss) - self.rss0
        self.peak_private = max(self._max_anon, hwm - self._max_shared) - self.anon0

    def _sample_once(self) -> None:
        rss, shared = _statm()
        self._max_anon, self._max_shared = max(self._max_anon, rss - shared), max(self._max_shared, shared)
        self._max_rss = max(self._max_rss, rss)


def object_bytes(refs: list[ray.ObjectRef]) -> int:
    """Bytes the object store holds for ``refs`` (Ray's own size of each object)."""
    if not refs:
        return 0
    return sum(int(loc.get("object_size") or 0) for loc in ray.experimental.get_object_locations(refs).values())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


FAST_S = 0.05  # warm loads faster than this are repeated up to --fast-repeats times


def more_loads(done: int, times: list[float], repeats: int, fast_repeats: int) -> bool:
    """Whether to time another reload (or round of them) after ``done``: ``repeats`` in all, or up to
    ``fast_repeats`` while the median of ``times`` is under ``FAST_S``."""
    return done < repeats or (done < fast_repeats and statistics.median(times) < FAST_S)


@ray.remote(num_cpus=1)
class BenchActor:
    """A fresh worker process that loads the model with one approach and reports times and memory.

    ``__init__`` imports what every approach needs (torch, the model's transformers module,
    safetensors, ray_zerocopy) and creates the CUDA context, so a cold load measures the load
    itself, not Python imports or CUDA start-up.
    """

    def __init__(self, spec: ModelSpec, device: str, share_gpu: bool = False) -> None:
        torch.set_num_threads(1)  # the same in every actor: outputs are compared bit for bit
        # zero-copy views of read-only memory make torch warn once per process; not what is measured
        warnings.filterwarnings("ignore", message=r"The given (NumPy array|buffer) is not writable")
        import safetensors.torch  # noqa: F401

        import ray_zerocopy  # noqa: F401

        build_model(spec, meta=True)  # imports the transformers model module
        if quantizer_module(spec.quantize):  # (importing the quantization library is not loading either)
            importlib.import_module(cast(str, quantizer_module(spec.quantize)))
        if device.startswith("cuda"):  # CUDA context creation (~0.3 s) is not loading: every approach pays it
            torch.zeros(1, device=device).sum().item()
        self.spec, self.device, self.share_gpu = spec, device, share_gpu
        self.ids = sample_input(spec)
        self.model: torch.nn.Module | None = None
        self.out: torch.Tensor | None = None
        gc.collect()
        self.base = process_memory()

    def info(self) -> dict[str, Any]:
        """This worker's pid and whether Ray's zero-copy flag is set in its environment."""
        return {"pid": os.getpid(), "native_flag": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "")}

    def _load(self, approach: str, handle: Any) -> float:
        chosen = get_approach(approach)
        extra = {"share_gpu": True} if self.share_gpu and chosen.kind == "ours" else {}
        t0 = time.perf_counter()
        model = chosen.load(handle, self.spec, self.device, **extra)
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.model = model
        return dt

    def load(self, approach: str, wrapped: list[Any]) -> float:
        """Seconds to load (``wrapped[0]`` is the handle; a list keeps Ray from resolving its refs)."""
        return self._load(approach, wrapped[0])

    def settle(self) -> None:
        """After a load: with ``share_gpu``, wait until this actor maps the holder's copy (a first load starts
        on its own); free what the caching allocator holds unused, so :meth:`device_used` counts the model."""
        if self.share_gpu and self.model is not None:
            from ray_zerocopy.gpu_share import wait_shared

            wait_shared(self.model, 120)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def device_used(self) -> tuple[str, int] | None:
        """(this actor's GPU UUID, bytes in use on that GPU by every process), or None on the CPU."""
        if not self.device.startswith("cuda"):
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return str(torch.cuda.get_device_properties(self.device).uuid), total - free

    def run_and_measure(self, files_marker: str | None) -> dict[str, Any]:
        """Run the loaded model once, then the memory it added to this process (see :func:`process_memory`)."""
        assert self.model is not None, "load first"
        self.out = run_model(self.model, self.ids)
        gc.collect()
        _trim_heap()
        now = process_memory(files_marker)
        return {k: now[k] - self.base[k] if k != "files" else now[k] for k in now}

    def check(self, reference_path: str) -> float:
        """Max abs difference between this model's output and the original weights' output, both here."""
        if self.spec.quantize == "none":
            reference = load_torch_file(self.spec, reference_path, mmap=True).to(self.device)
        else:  # the driver's quantized model itself
            with open(reference_path, "rb") as f:
                reference = pickle.load(f).to(self.device)
        expected = run_model(reference, self.ids)
        del reference
        assert self.out is not None, "run_and_measure first"
        return float((self.out - expected).abs().max())

    def warm(self, approach: str, wrapped: list[Any], repeats: int, fast_repeats: int = 0) -> list[float]:
        """Seconds of each of ``repeats`` further loads in this process (the previous model is dropped
        first), or of ``fast_repeats`` while their median is under ``FAST_S`` (cheap to repeat: more
        samples steady the median on a busy machine)."""
        times: list[float] = []
        while more_loads(len(times), times, repeats, fast_repeats):
            self.drop()
            times.append(self._load(approach, wrapped[0]))
        self.model = None
        return times

    def drop(self) -> None:
        """Let go of the loaded model and its output (before a reload)."""
        self.model = self.out = None
        gc.collect()

    def pinned_peak(self, nbytes: int, repeats: int = 5) -> float:
        """Best GB/s of one pinned host buffer copied to this actor's GPU (the link's practical peak)."""
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst.copy_(src, non_blocking=True)
        _sync(self.device)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            _sync(self.device)
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e9
