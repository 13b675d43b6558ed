"""Test helpers a third-party backend can run on itself: a model zoo of hard cases (``zoo.py``),
a zero-copy proof (``proof.py``), and conformance checks of a backend (:func:`check_backend`, ``kit.py``) and
of a tensor adapter (:func:`check_tensor_adapter`, ``adapter_kit.py``).
"""

from __future__ import annotations

from ray_zerocopy.testing.adapter_kit import check_tensor_adapter
from ray_zerocopy.testing.kit import GENERIC_BAD_PAYLOADS, KIT_MODELS, check_backend, dtype_zoo
from ray_zerocopy.testing.proof import merged_mappings, shared_mappings, tensors_outside_shared_memory, unique_tensors
from ray_zerocopy.testing.zoo import ZOO, HardCases, zoo_input, zoo_model

__all__ = [
    "GENERIC_BAD_PAYLOADS", "KIT_MODELS", "ZOO", "HardCases", "check_backend", "check_tensor_adapter", "dtype_zoo",
    "merged_mappings",
    "shared_mappings", "tensors_outside_shared_memory", "unique_tensors", "zoo_input", "zoo_model",
]
