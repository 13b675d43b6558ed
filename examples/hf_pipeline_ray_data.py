"""A Hugging Face ``pipeline(...)`` object shared by a Ray Data actor pool, one copy of its model.

Runs as is on a laptop:  python examples/hf_pipeline_ray_data.py
The driver builds a ``transformers.pipeline("text-classification", ...)`` (here a BERT built from
its config with an offline WordPiece vocabulary, so nothing is downloaded; use
``pipeline("text-classification", model="<name>")`` in real use), splits it with
``rewrite_pipeline_for_actors`` (the model's weights go into the object store once; the
tokenizer and the rest travel in the small skeleton), and every actor of the pool rebuilds it
with ``load_pipeline_in_actor`` in milliseconds. It checks the labels and scores against the
driver's own pipeline.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, pipeline

from ray_zerocopy import load_pipeline_in_actor, rewrite_pipeline_for_actors

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] the a ray model share one copy good bad great movie plot slow fast".split()


def build_pipeline(small: bool):
    """A text-classification pipeline over a randomly initialised BERT (labels neg/neu/pos)."""
    vocab = Path(tempfile.mkdtemp()) / "vocab.txt"
    vocab.write_text("\n".join(WORDS))
    torch.manual_seed(0)
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if small else {}
    cfg = BertConfig(vocab_size=len(WORDS), num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, **size)
    model = BertForSequenceClassification(cfg).eval()
    return pipeline("text-classification", model=model, tokenizer=BertTokenizer(str(vocab)))


class Classify:
    """One actor of the pool: rebuilds the pipeline around the shared weights, then classifies batches."""

    def __init__(self, skeleton, model_refs):
        self.pipe = load_pipeline_in_actor(skeleton, model_refs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.pipe(list(batch["text"]))
        return {"text": batch["text"], "label": np.array([o["label"] for o in out]),
                "score": np.array([o["score"] for o in out])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="a 2-layer, 32-wide BERT instead of BERT-base's shape")
    args = parser.parse_args()
    pipe = build_pipeline(args.small)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS[5:], 6)) for _ in range(args.rows)]
    ray.init(address="local", num_cpus=8, object_store_memory=1024**3, include_dashboard=False, log_to_driver=False)
    try:
        skeleton, refs = rewrite_pipeline_for_actors(pipe)
        print(f"prepared {sorted(refs)}: {sum(r.nbytes for r in refs.values()) / 2**20:.1f} MB in the object store")
        rows = ray.data.from_items([{"text": t} for t in texts]).map_batches(
            # ray.put: Ray Data repr()s its constructor kwargs, and a transformers pipeline's repr reads its
            # model, which is None in the skeleton (load_pipeline_in_actor accepts the ObjectRef)
            Classify, fn_constructor_kwargs={"skeleton": ray.put(skeleton), "model_refs": refs}, batch_size=16,
            compute=ActorPoolStrategy(size=args.actors), num_cpus=1,
        ).take_all()
    finally:
        ray.shutdown()
    want = {t: o for t, o in zip(texts, pipe(texts))}
    same = sum(r["label"] == want[r["text"]]["label"] for r in rows)
    err = max(abs(float(r["score"]) - want[r["text"]]["score"]) for r in rows)
    ok = len(rows) == len(texts) and same == len(rows) and err < 1e-5
    print(f"classified {len(rows)} rows with {args.actors} actors; labels equal to the driver's pipeline: "
          f"{same}/{len(rows)}; max |score diff|: {err:.1e} -> {'OK' if ok else 'MISMATCH'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
