"""An RL-style loop: a trainer actor publishes new weights every step, N rollout actors take them in place.

The trainer trains its own copy of a small GPT-2 (here: one SGD step on the rollouts' samples), then puts the
new weights into the object store once (``prepare_model_for_actors(model, like=previous)``: only the weights,
one copy per node). Every rollout actor calls ``update_model_in_actor``: its model object stays, its CPU
weights become views of the new shared copy (on a GPU, the bytes are copied into its device tensors). The
old version leaves the store once every rollout moved on and the driver dropped its ref.

    python examples/rl_weight_updates.py --rollouts 2 --steps 5

Each step prints the checksum of the trainer's weights and of every rollout's: they agree after each update.
"""

from __future__ import annotations

import argparse

import ray
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ray_zerocopy import load_model_in_actor, prepare_model_for_actors, update_model_in_actor


def checksum(model: torch.nn.Module) -> float:
    return round(float(sum(p.double().sum() for p in model.parameters())), 6)


@ray.remote(num_cpus=0)
class Trainer:
    def __init__(self) -> None:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                            eos_token_id=0)
        self.model = GPT2LMHeadModel(config).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.ref = prepare_model_for_actors(self.model)

    def published(self):
        return self.ref, checksum(self.model)

    def train_step(self, samples: list[torch.Tensor]):
        """One step on the rollouts' samples, then publish: the new ref (only the weights were put)."""
        batch = torch.cat(samples)
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ref = prepare_model_for_actors(self.model, like=self.ref)  # (the trainer owns every version)
        return self.ref, checksum(self.model)


@ray.remote(num_cpus=0)
class Rollout:
    def __init__(self, ref, seed: int) -> None:
        self.model = load_model_in_actor(ref)
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, ref) -> float:
        update_model_in_actor(self.model, ref)
        return checksum(self.model)

    def generate(self) -> torch.Tensor:
        prompt = torch.randint(1, 512, (2, 4), generator=self.generator)
        with torch.no_grad():
            return self.model.generate(prompt, max_new_tokens=12, do_sample=True, pad_token_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    ray.init(num_cpus=max(2, args.rollouts), include_dashboard=False, log_to_driver=False)
    trainer = Trainer.remote()
    ref, trained = ray.get(trainer.published.remote())
    rollouts = [Rollout.remote(ref, seed) for seed in range(args.rollouts)]
    for step in range(args.steps):
        samples = ray.get([r.generate.remote() for r in rollouts])
        ref, trained = ray.get(trainer.train_step.remote(samples))
        seen = ray.get([r.update.remote(ref) for r in rollouts])
        status = "OK" if all(s == trained for s in seen) else "MISMATCH"
        print(f"step {step}: trainer {trained} rollouts {seen} -> {status}")
        if status != "OK":
            raise SystemExit(1)
    ray.shutdown()


if __name__ == "__main__":
    main()
