"""Test helpers a third-party backend can run on itself: a model zoo of hard cases (``zoo.py``),
a zero-copy proof (``proof.py``), and (see :func:`check_backend`) a conformance check (``kit.py``).
"""

from __future__ import annotations

from ray_zerocopy.testing.kit import GENERIC_BAD_PAYLOADS, KIT_MODELS, check_backend, dtype_zoo
from ray_zerocopy.testing.proof import merged_mappings, shared_mappings, tensors_outside_shared_memory, unique_tensors
from ray_zerocopy.testing.zoo import ZOO, HardCases, zoo_input, zoo_model

__all__ = [
    "GENERIC_BAD_PAYLOADS", "KIT_MODELS", "ZOO", "HardCases", "check_backend", "dtype_zoo", "merged_mappings",
    "shared_mappings", "tensors_outside_shared_memory", "unique_tensors", "zoo_input", "zoo_model",
]
