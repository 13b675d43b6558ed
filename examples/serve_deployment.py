"""Ray Serve: 4 replicas of one deployment on a node share one copy of a model's weights.

Runs as is on a laptop (it starts a local Ray and Serve):  python examples/serve_deployment.py
The driver prepares a BERT encoder once (``prepare_model_for_actors``) and passes the small
ModelRef through ``.bind(...)``; each replica calls ``load_model_in_actor`` in its ``__init__``.
It queries the deployment over HTTP (Serve's proxy) and through a handle, checks every answer
against the driver's own model, and prints each replica's private memory and start time.
``--compare`` also deploys the usual way (the model itself in ``.bind(model)``: every replica
unpickles its own copy) and prints both side by side.
"""

from __future__ import annotations

import argparse
import os
import time
import zlib

import psutil
import ray
import requests
import torch
from ray import serve
from transformers import BertConfig, BertModel

from ray_zerocopy import load_model_in_actor, prepare_model_for_actors

VOCAB, SEQ = 30522, 16
TEXTS = ["ray serve replicas share one model", "four replicas one copy of the weights", "hello world"]


def tokenize(texts: list[str]) -> torch.Tensor:
    """A stand-in tokenizer (hashes words to ids) so the example needs no downloads."""
    ids = torch.zeros(len(texts), SEQ, dtype=torch.int64)
    for row, text in enumerate(texts):
        words = [zlib.crc32(w.encode()) % VOCAB for w in text.lower().split()][:SEQ]
        ids[row, : len(words)] = torch.tensor(words)
    return ids


def private_mb(pid: int | str = "self") -> float:
    """Private_Clean + Private_Dirty (the process's USS) from /proc/<pid>/smaps_rollup, in MiB."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


@serve.deployment(num_replicas=4, ray_actor_options={"num_cpus": 0})
class Embedder:
    """A replica: loads the shared model (or takes the model it was given) and embeds texts."""

    def __init__(self, model):
        self.model = load_model_in_actor(model) if not isinstance(model, torch.nn.Module) else model.eval()
        with torch.no_grad():  # read every weight once, as serving does
            sum(float(p.sum()) for p in self.model.parameters())
        self.start_s = time.time() - psutil.Process().create_time()  # process start to ready

    def embed(self, texts: list[str]) -> list:
        with torch.no_grad():
            return self.model(input_ids=tokenize(texts)).last_hidden_state[:, 0].tolist()

    def stats(self) -> dict:
        return {"pid": os.getpid(), "start_s": self.start_s, "private_mb": private_mb()}

    async def __call__(self, request) -> dict:
        return {"embedding": self.embed((await request.json())["texts"])}


def replica_stats(handle, replicas: int) -> list[dict]:
    found: dict[int, dict] = {}
    while len(found) < replicas:
        for s in [r.result() for r in [handle.stats.remote() for _ in range(4 * replicas)]]:
            found[s["pid"]] = s
    return sorted(found.values(), key=lambda s: s["pid"])


def run(label: str, arg, model: torch.nn.Module, replicas: int, port: int) -> list[dict]:
    start = time.perf_counter()
    handle = serve.run(Embedder.options(num_replicas=replicas).bind(arg), name=label, route_prefix=f"/{label}")
    ready_s = time.perf_counter() - start
    with torch.no_grad():
        want = model(input_ids=tokenize(TEXTS)).last_hidden_state[:, 0]
    http = [requests.post(f"http://127.0.0.1:{port}/{label}", json={"texts": TEXTS}, timeout=60).json()["embedding"]
            for _ in range(2 * replicas)]
    via_handle = handle.embed.remote(TEXTS).result()
    err = max(float((torch.tensor(got) - want).abs().max()) for got in http + [via_handle])
    stats = replica_stats(handle, replicas)
    print(f"[{label}] {replicas} replicas ready in {ready_s:.1f} s; {len(http)} HTTP answers and 1 handle answer; "
          f"max |diff| vs driver model: {err:.1e} -> {'OK' if err < 1e-4 else 'MISMATCH'}")
    for s in stats:
        print(f"    replica pid {s['pid']}: private memory {s['private_mb']:.0f} MiB, started in {s['start_s']:.2f} s")
    serve.delete(label)
    if err >= 1e-4:
        raise SystemExit(f"{label}: outputs differ from the driver's model by {err}")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--small", action="store_true", help="a 2-layer encoder instead of BERT-base")
    parser.add_argument("--compare", action="store_true", help="also deploy the usual way (.bind(model))")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=256) \
        if args.small else BertConfig()
    model = BertModel(cfg).eval()
    size_mb = sum(t.nbytes for t in model.state_dict().values()) / 2**20
    ray.init(address="local", num_cpus=8, object_store_memory=2 * 1024**3, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        print(f"model: {size_mb:.0f} MB of weights")
        ours = run("zerocopy", prepare_model_for_actors(model), model, args.replicas, args.port)
        if args.compare:
            usual = run("usual", model, model, args.replicas, args.port)
            print(f"side by side (medians over replicas): private memory {_median(ours, 'private_mb'):.0f} vs "
                  f"{_median(usual, 'private_mb'):.0f} MiB, start {_median(ours, 'start_s'):.2f} vs "
                  f"{_median(usual, 'start_s'):.2f} s (ray_zerocopy vs .bind(model))")
    finally:
        serve.shutdown()
        ray.shutdown()


def _median(stats: list[dict], key: str) -> float:
    values = sorted(s[key] for s in stats)
    return values[len(values) // 2]


if __name__ == "__main__":
    main()
