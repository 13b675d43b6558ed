"""Ray Data batch inference with several actors sharing one copy of a model.

Runs as is on a laptop (it starts a local Ray):  python examples/ray_data_actor_example.py
1. a BERT-base encoder (built from its config: 110M parameters, 438 MB) shared by 4 CPU actors;
2. a multi-model pipeline (encoder + classifier, with pre- and post-processing) in one object;
3. the same on a GPU actor, when this machine has a GPU.
It prints what each actor did and how much memory the sharing saved.
"""

from __future__ import annotations

import argparse
import os
import time
import zlib

import numpy as np
import psutil
import ray
import torch
from ray.data import ActorPoolStrategy
from transformers import BertConfig, BertModel

from ray_zerocopy.actor import (
    load_model_in_actor,
    load_pipeline_in_actor,
    prepare_model_for_actors,
    rewrite_pipeline_for_actors,
)

VOCAB, SEQ = 30522, 16
LABELS = np.array(["negative", "neutral", "positive"])


def tokenize(texts: np.ndarray) -> torch.Tensor:
    """A stand-in tokenizer (hashes words to ids) so the example needs no downloads."""
    ids = np.zeros((len(texts), SEQ), dtype=np.int64)
    for row, text in enumerate(texts):
        words = [zlib.crc32(w.encode()) % VOCAB for w in str(text).lower().split()][:SEQ]
        ids[row, : len(words)] = words
    return torch.from_numpy(ids)


class EmbedActor:
    """One actor of the pool: loads the shared model once, then embeds batches."""

    def __init__(self, model_ref, device: str = "cpu"):
        import transformers.models.bert.modeling_bert  # noqa: F401 (import cost is not load cost)

        uss_before = _uss_mb()
        start = time.perf_counter()
        self.model = load_model_in_actor(model_ref, device=device)
        self.load_ms = (time.perf_counter() - start) * 1e3
        with torch.no_grad():  # read every weight once, so all its pages are mapped in this process
            sum(float(p.sum()) for p in self.model.parameters())
        self.added_mb = _uss_mb() - uss_before
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            ids = tokenize(batch["text"]).to(self.device)
            emb = self.model(input_ids=ids).last_hidden_state[:, 0].float().cpu().numpy()
        n = len(emb)
        return {"text": batch["text"], "embedding": emb, "pid": np.full(n, os.getpid()),
                "load_ms": np.full(n, self.load_ms), "added_mb": np.full(n, self.added_mb)}


class SentimentPipeline:
    """Pre-processing, two models and post-processing in one object (as users write pipelines)."""

    def __init__(self, encoder: torch.nn.Module, hidden: int):
        self.encoder = encoder
        self.classifier = torch.nn.Sequential(torch.nn.Linear(hidden, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))

    def __call__(self, texts: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            cls = self.encoder(input_ids=tokenize(texts)).last_hidden_state[:, 0]
            return LABELS[self.classifier(cls).argmax(-1).numpy()]


class PipelineActor:
    def __init__(self, skeleton, model_refs):
        self.pipeline = load_pipeline_in_actor(skeleton, model_refs)

    def __call__(self, batch):
        return {"text": batch["text"], "label": self.pipeline(batch["text"])}


def _uss_mb() -> float:
    return psutil.Process().memory_full_info().uss / 2**20


def _texts(n: int) -> ray.data.Dataset:
    words = "ray shares one model across many actors without copying the weights again".split()
    rng = np.random.default_rng(0)
    return ray.data.from_items([{"text": " ".join(rng.choice(words, 8))} for _ in range(n)])


def run_simple(model: torch.nn.Module, actors: int, rows: int) -> None:
    size_mb = sum(t.nbytes for t in model.state_dict().values()) / 2**20
    start = time.perf_counter()
    ref = prepare_model_for_actors(model)
    print(f"[1] prepared a {size_mb:.0f} MB model in {time.perf_counter() - start:.2f} s "
          f"(stored once: {ref.nbytes / 2**20:.0f} MB in the object store)")
    out = _texts(rows).map_batches(
        EmbedActor, fn_constructor_kwargs={"model_ref": ref}, batch_size=32,
        compute=ActorPoolStrategy(size=actors), num_cpus=1,
    ).take_all()
    with torch.no_grad():  # check a few rows against the driver's own model
        sample = np.array([r["text"] for r in out[:4]])
        expected = model(input_ids=tokenize(sample)).last_hidden_state[:, 0].numpy()
    err = float(np.abs(np.stack([r["embedding"] for r in out[:4]]) - expected).max())
    per_actor = {int(r["pid"]): (float(r["load_ms"]), float(r["added_mb"])) for r in out}
    print(f"    embedded {len(out)} rows with {len(per_actor)} actors; max |diff| vs driver model: {err:.2e}")
    for pid, (load_ms, added) in sorted(per_actor.items()):
        print(f"    actor pid {pid}: model loaded in {load_ms:.1f} ms; private memory (USS) added "
              f"by loading and reading every weight: {added:.1f} MB")
    print(f"    weights in memory: {ref.nbytes / 2**20:.0f} MB shared by {len(per_actor)} actors "
          f"instead of {len(per_actor) * size_mb:.0f} MB ({len(per_actor)} private copies)")


def run_pipeline(encoder: torch.nn.Module, hidden: int, actors: int, rows: int) -> None:
    pipeline = SentimentPipeline(encoder, hidden)
    skeleton, refs = rewrite_pipeline_for_actors(pipeline)
    out = _texts(rows).map_batches(
        PipelineActor, fn_constructor_kwargs={"skeleton": skeleton, "model_refs": refs}, batch_size=32,
        compute=ActorPoolStrategy(size=actors), num_cpus=1,
    ).take_all()
    counts = {str(label): int(sum(r["label"] == label for r in out)) for label in LABELS}
    print(f"[2] pipeline with models {sorted(refs)} classified {len(out)} rows with {actors} actors: {counts}")


def run_gpu(model: torch.nn.Module, rows: int) -> None:
    if not torch.cuda.is_available():
        print("[3] GPU inference skipped: no CUDA device on this machine")
        return
    ref = prepare_model_for_actors(model)
    out = _texts(rows).map_batches(
        EmbedActor, fn_constructor_kwargs={"model_ref": ref, "device": "cuda"}, batch_size=64,
        compute=ActorPoolStrategy(size=1), num_gpus=1,
    ).take_all()
    print(f"[3] GPU actor loaded the model in {out[0]['load_ms']:.0f} ms and embedded {len(out)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=4)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--small", action="store_true", help="a 2-layer encoder instead of BERT-base")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, intermediate_size=512) \
        if args.small else BertConfig()
    model = BertModel(cfg).eval()
    ray.init(num_cpus=max(8, 2 * args.actors), object_store_memory=2 * 1024**3, include_dashboard=False)
    try:
        run_simple(model, args.actors, args.rows)
        run_pipeline(model, cfg.hidden_size, min(2, args.actors), args.rows)
        run_gpu(model, args.rows)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
