"""Typed errors. Each names the bad value, what was expected, and the fix.

Every error subclasses the builtin exception that fits, so ``except ValueError``
still works for callers that do not know this library.
"""

from __future__ import annotations


def _rebuild(cls: type[RayZeroCopyError], message: str, state: dict) -> RayZeroCopyError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class RayZeroCopyError(Exception):
    """Base class of every error raised by ray_zerocopy.

    Errors raised in an actor reach the driver through pickling; the subclasses' rich
    constructors would break the default reduce, so every error pickles its message and attributes.
    """

    def __reduce__(self) -> tuple:
        return _rebuild, (type(self), str(self), self.__dict__)


class NotAModuleError(RayZeroCopyError, TypeError):
    """Something that is not a ``torch.nn.Module`` was given where a model was expected."""

    def __init__(self, value: object, where: str = "model") -> None:
        self.value = value
        super().__init__(
            f"{where} must be a torch.nn.Module, got {type(value).__module__}.{type(value).__qualname__}. "
            "Fix: pass the nn.Module itself (not its state_dict, a path, or an ObjectRef)."
        )


class NoModelsError(RayZeroCopyError, ValueError):
    """A pipeline holds no ``torch.nn.Module`` attribute to share."""

    def __init__(self, pipeline: object) -> None:
        self.pipeline = pipeline
        super().__init__(
            f"pipeline {type(pipeline).__qualname__}: no attribute is a torch.nn.Module. Fix: store the models as "
            "attributes of the pipeline object, or name them with model_attr_names=[...]."
        )


class UnknownBackendError(RayZeroCopyError, ValueError):
    """No transport of this name is registered in this process."""

    def __init__(self, name: object, available: list[str]) -> None:
        self.name = name
        self.available = available
        super().__init__(
            f"unknown ray_zerocopy backend {name!r}; registered here: {', '.join(sorted(available)) or 'none'}. "
            "Fix: use one of those names, or install the package that provides this backend; a third-party "
            "backend must be installed in the driver and on every node where actors run."
        )


class DuplicateBackendError(RayZeroCopyError, ValueError):
    """Two plugins registered a backend (or a tensor adapter) under the same name."""

    def __init__(self, name: str, first: str, second: str, kind: str = "backend") -> None:
        self.name, self.first, self.second = name, first, second
        super().__init__(
            f"{kind} name {name!r} is registered by two plugins: {first!r} and {second!r}. "
            "Fix: uninstall one of them, or set RAY_ZEROCOPY_DISABLE_PLUGIN_AUTOLOAD=1 and register the one you want."
        )


class BackendMismatchError(RayZeroCopyError, ValueError):
    """``backend=`` given at load time disagrees with the backend the weights were stored with."""

    def __init__(self, requested: str, recorded: str) -> None:
        self.requested, self.recorded = requested, recorded
        super().__init__(
            f"backend={requested!r} was requested, but this model ref was prepared with backend {recorded!r}. "
            f"Fix: pass backend=None (uses {recorded!r}) or prepare the model again with backend={requested!r}."
        )


class FormatVersionError(RayZeroCopyError, ValueError):
    """The payload was written by a backend version this process cannot read."""

    def __init__(self, backend: str, recorded: int, supported: int) -> None:
        self.backend, self.recorded, self.supported = backend, recorded, supported
        super().__init__(
            f"backend {backend!r} payload has format version {recorded}, this process reads version {supported}. "
            "Fix: install the same ray_zerocopy (and backend plugin) version in the driver and the actors."
        )


class InvalidModelRefError(RayZeroCopyError, TypeError):
    """``load_*`` was given something that is not a model ref."""

    def __init__(self, value: object) -> None:
        self.value = value
        super().__init__(
            f"expected a ModelRef from prepare_model_for_actors() (or an ObjectRef to one), got "
            f"{type(value).__qualname__}. Fix: pass the value prepare_model_for_actors() returned."
        )


class DeviceError(RayZeroCopyError, ValueError):
    """The requested device does not exist (or is not visible) in this process."""

    def __init__(self, device: object, reason: str, fix: str | None = None) -> None:
        self.device, self.reason = device, reason
        fix = fix or ("ask Ray for the device (e.g. num_gpus=1 on the actor or in map_batches) and pass "
                      "device='cuda', or load with device='cpu'")
        super().__init__(f"device {device!r} is not usable here: {reason}. Fix: {fix}.")


class EnvVarError(RayZeroCopyError, ValueError):
    """An environment variable that ray_zerocopy reads holds a value it cannot use."""

    def __init__(self, name: str, value: str, expected: str) -> None:
        self.name, self.value, self.expected = name, value, expected
        super().__init__(f"{name}={value!r}: expected {expected}. Fix: set {name} to such a value, or unset it "
                         "for the default.")


class InvalidRegistrationError(RayZeroCopyError, TypeError):
    """A plugin's hook registered something that is not a backend (or tensor adapter) class with a ``name``."""

    def __init__(self, plugin: str, value: object, base: str = "Backend") -> None:
        self.plugin, self.value = plugin, value
        super().__init__(f"plugin {plugin!r} registered {value!r}: expected a ray_zerocopy.{base} subclass with "
                         f"a `name`. Fix: subclass ray_zerocopy.{base} and set name = '...'.")


class UnsupportedModelError(RayZeroCopyError, TypeError):
    """The model (or one of its submodules) cannot be split into skeleton and weights."""

    def __init__(self, submodule: str, problem: str, fix: str) -> None:
        self.submodule, self.problem, self.fix = submodule, problem, fix
        super().__init__(f"submodule {submodule or '<root>'!r}: {problem}. Fix: {fix}")


class PayloadError(RayZeroCopyError, ValueError):
    """A backend payload is malformed (bad header, offsets out of range, unknown dtype, ...)."""

    def __init__(self, tensor: str | None, problem: str, fix: str | None = None) -> None:
        self.tensor, self.problem = tensor, problem
        where = f"tensor {tensor!r}" if tensor is not None else "payload"
        fix = fix or "prepare the model again; the stored weights are damaged or were written by an incompatible writer"
        super().__init__(f"{where}: {problem}. Fix: {fix}.")


class SharedWeightWriteError(RayZeroCopyError, RuntimeError):
    """A model wrote in place into weights it shares on a GPU with other actors (``share_gpu=True``)."""

    def __init__(self, module: str, module_type: str, tensor: str, what: str) -> None:
        self.module, self.module_type, self.tensor = module, module_type, tensor
        super().__init__(
            f"submodule {module or '<root>'!r} ({module_type}) {what}: tensor {tensor!r} is one device copy "
            "shared by every actor on this GPU that loaded the model with share_gpu=True; the stored weights "
            "were put back. Fix: do not modify the weights in place, or load the model without share_gpu=True "
            "(or with private_copy=True) to give this actor its own writable device copy."
        )


class WeightsLostError(RayZeroCopyError, RuntimeError):
    """The shared weights are gone from the cluster (their owner died, or the object was lost or evicted),
    or cannot be found from here (a ModelRef pickled outside Ray: ``object_ref`` names the ObjectRef)."""

    def __init__(self, cause: BaseException, object_ref: object = None, session: tuple[str, str] | None = None) -> None:
        self.cause, self.object_ref = cause, object_ref
        if session is not None:
            Exception.__init__(self, str(cause))
            return
        if object_ref is not None:
            Exception.__init__(self, _untracked_message(object_ref))
            return
        first_line = str(cause).splitlines()[0] if str(cause) else ""
        super().__init__(  # (the why, in full: docs/errors.md)
            f"the model's weights are gone from Ray's object store ({type(cause).__name__}: {first_line[:160]}): "
            "their owner died (the process that prepared them, or its node= owner), or they were lost or evicted. "
            "Fix: keep the process that prepared the model, and its ModelRef, alive while actors may (re)load it; "
            "prepare it again and restart the job."
        )


class LoadDtypeError(RayZeroCopyError, TypeError):
    """``dtype=`` given at load time is not a floating-point ``torch.dtype``."""

    def __init__(self, dtype: object) -> None:
        self.dtype = dtype
        super().__init__(
            f"dtype={dtype!r} cannot be used to load a model: expected a floating-point torch.dtype "
            "(torch.float16, torch.bfloat16, torch.float32, ...); only floating-point weights are converted. "
            "Fix: pass e.g. dtype=torch.float16, or dtype=None to keep the stored dtypes."
        )


class AdaptedDtypeError(LoadDtypeError):
    """``dtype=`` at load time, for a model with quantized (adapter-carried) tensors, which cannot be cast."""

    def __init__(self, dtype: object, tensor: str, kind: str) -> None:
        self.dtype, self.tensor, self.kind = dtype, tensor, kind
        RayZeroCopyError.__init__(
            self,
            f"dtype={dtype!r} cannot convert tensor {tensor!r}: it is a {kind} (quantized, carried by a tensor "
            "adapter), not floating-point weights. Fix: load without dtype= (a quantized model keeps the dtypes it "
            "was quantized with), or build and quantize the model in the dtype you want before preparing it."
        )


class CheckpointError(RayZeroCopyError, ValueError):
    """``checkpoint=`` is not a readable safetensors checkpoint (file, folder or sharded folder)."""

    def __init__(self, path: object, problem: str, fix: str | None = None) -> None:
        self.path, self.problem = path, problem
        fix = fix or ("pass a .safetensors file, or a folder in Hugging Face layout holding model.safetensors or "
                      "model.safetensors.index.json and its shards (save one with model.save_pretrained(folder) "
                      "or safetensors.torch.save_file)")
        super().__init__(f"checkpoint {str(path)!r}: {problem}. Fix: {fix}.")


class CheckpointMismatchError(RayZeroCopyError, ValueError):
    """The checkpoint's tensors do not match the model's (names, shapes or dtypes); nothing was stored.

    Attributes:
        missing: model tensors on the meta device that no checkpoint tensor fills.
        unexpected: checkpoint tensors with no tensor of that name in the model.
        mismatched: ``(name, (model dtype, shape), (checkpoint dtype, shape))`` of tensors that differ.
    """

    def __init__(self, path: object, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...]]]]) -> None:
        self.path, self.missing, self.unexpected, self.mismatched = path, missing, unexpected, mismatched
        lines = [f"missing from the checkpoint (left on the meta device): {n}" for n in missing]
        lines += [f"in the checkpoint but not in the model: {n}" for n in unexpected]
        lines += [f"{n}: the model has {m[0]}{list(m[1])}, the checkpoint {c[0]}{list(c[1])}" for n, m, c in mismatched]
        shown = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
        super().__init__(
            f"checkpoint {str(path)!r} does not match the model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(mismatched)} mismatched):\n  {shown}\nFix: build the model from the same config "
            "and dtype the checkpoint was saved with (e.g. under accelerate.init_empty_weights(), with "
            "torch_dtype= the checkpoint's dtype), or pass the checkpoint saved from this model class."
        )


class PrepareNodeError(RayZeroCopyError, ValueError):
    """``node=`` names no alive node of the cluster, or cannot be used with the other arguments."""

    def __init__(self, node: object, problem: str, fix: str) -> None:
        self.node, self.problem, self.fix = node, problem, fix
        super().__init__(f"node={node!r}: {problem}. Fix: {fix}")


class MethodNotFoundError(RayZeroCopyError, ValueError):
    """``method_names`` names a method the model does not have (checked in the driver, at rewrite time)."""

    def __init__(self, method: str, model_type: str, available: list[str]) -> None:
        self.method, self.model_type, self.available = method, model_type, available
        super().__init__(
            f"method_names contains {method!r}, but {model_type} has no method of that name "
            f"(its public methods include: {', '.join(available[:12]) or 'none'}). "
            "Fix: list only methods the model defines (\"__call__\" for model(x)) in method_names."
        )


class ShimAttributeError(RayZeroCopyError, AttributeError):
    """A task-mode shim (``rewrite_pipeline``) was asked for an attribute it cannot serve in the driver."""

    def __init__(self, attribute: str, model_type: str, problem: str, fix: str) -> None:
        self.attribute, self.model_type, self.problem, self.fix = attribute, model_type, problem, fix
        super().__init__(f"{model_type}.{attribute} read through a rewrite_pipeline shim: {problem}. Fix: {fix}")


class OtherSessionError(RayZeroCopyError, RuntimeError):
    """A ModelRef was prepared in another Ray session than the one this process is connected to (the cause
    of the :class:`WeightsLostError` raised when it is passed to an actor or loaded)."""

    def __init__(self, prepared_in: str, here: str) -> None:
        self.prepared_in, self.here = prepared_in, here
        super().__init__(
            f"the model's weights cannot be loaded here: this ModelRef was prepared in Ray session {prepared_in!r}, "
            f"but this process is connected to Ray session {here!r}. Objects of a session end with it (ray.shutdown(), "
            "a restarted cluster), and are unknown to another Ray (a process that started its own, e.g. under the "
            "'spawn' start method). Fix: call prepare_model_for_actors (or rewrite_pipeline_for_actors) again in "
            "this session, and pass that ModelRef to the actors."
        )


class PipelineRefsError(RayZeroCopyError, ValueError):
    """``load_pipeline_in_actor`` was given model refs that do not match the pipeline skeleton."""

    def __init__(self, expected: list[str], given: object, problem: str) -> None:
        self.expected, self.given, self.problem = expected, given, problem
        super().__init__(
            f"load_pipeline_in_actor: {problem}. The skeleton's models: {expected}; given: {given!r:.300}. Fix: pass "
            "the {attribute name: ModelRef} dict that rewrite_pipeline_for_actors returned with this skeleton, unchanged."
        )


class PipelineRefsTypeError(PipelineRefsError, TypeError):
    """``load_pipeline_in_actor`` was given something other than a dict of ModelRefs (a list, a ModelRef, ...)."""


class HiddenModelError(RayZeroCopyError, TypeError):
    """A pipeline's skeleton would still hold a model with weights (inside another object, not as an attribute of the
    pipeline or an item of its dict, list or tuple attributes): every actor would unpickle its own copy."""

    def __init__(self, path: str | None, model_type: str, nbytes: int) -> None:
        self.path, self.model_type, self.nbytes = path, model_type, nbytes
        where = f"at {path!r}" if path else "reached while pickling it (not through attributes or containers)"
        super().__init__(
            f"rewrite_pipeline_for_actors: the pipeline holds a {model_type} ({nbytes / 2**20:.2f} MiB of weights) "
            f"{where}, inside an object that is neither the pipeline nor one of its dict, list or tuple attributes: it "
            "would be pickled into the skeleton, and every actor would get its own copy. Fix: hold the model only as "
            "an attribute of the pipeline (or in a dict, list or tuple attribute of it) so it is shared, or prepare it "
            "yourself with prepare_model_for_actors and load it in the actor with load_model_in_actor"
        )


class UnexpectedArgumentError(RayZeroCopyError, TypeError):
    """A keyword argument this function does not take (often one of the original ray_zerocopy's)."""

    def __init__(self, function: str, argument: str, value: object, fix: str) -> None:
        self.function, self.argument, self.value = function, argument, value
        super().__init__(f"{function}() does not take {argument}={value!r}. Fix: {fix}")


class SkeletonLoadError(RayZeroCopyError):
    """The model's skeleton cannot be unpickled where the load runs (base of the two cases below)."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"the model's skeleton cannot be unpickled here: {problem}. Fix: {fix}")


class SkeletonImportError(SkeletonLoadError, ImportError):
    """A class of the model (or of something it holds) is importable in the driver but not where the load runs."""


class SkeletonDamagedError(SkeletonLoadError, ValueError):
    """The skeleton's bytes are truncated or damaged (a ModelRef built or changed by hand)."""


def _untracked_message(object_ref: object) -> str:
    return (
        f"the model's weights cannot be found: {object_ref!r} has no owner known to this process, so Ray "
        "does not track it and ray.get would wait forever, whether the weights still exist or were freed. "
        "The ModelRef was serialized outside Ray (the standard pickle module), and a ModelRef loaded "
        "that way does not keep its weights alive. Fix: pass the ModelRef itself to actors and tasks (as an "
        "argument, in fn_constructor_kwargs, or through ray.put), and keep the ModelRef from "
        "prepare_model_for_actors alive in the driver while actors load it."
    )


class BackendArgumentError(RayZeroCopyError, TypeError):
    """``backend=`` is not a backend name: usually an argument of the original ray_zerocopy passed by position."""

    def __init__(self, value: object, function: str, position: int, original: str | None = None,
                 optional: bool = False) -> None:
        self.value, self.function, self.position, self.original = value, function, position, original
        kind = "a device name" if isinstance(value, str) else f"of type {type(value).__qualname__}"
        was = f"; in the original ray_zerocopy it was `{original}`" if original else ""
        fix = {
            None: "pass a backend name, by keyword: backend='object_store'",
            "device": "pass the device to load_pipeline_in_actor(..., device=...) in the actor (a pipeline is "
                      "prepared on no device), and backend= only by keyword",
        }.get(original, f"pass {original}= (and device=) by keyword, e.g. {function}(..., device='cpu', "
                        f"{original}=True)")
        super().__init__(
            f"{function}(): backend={value!r} is {kind}, expected a backend name (a str such as 'object_store'; "
            f"`python -m ray_zerocopy backends` lists them){' or None' if optional else ''}. Positional argument "
            f"{position} of {function} is `backend`{was}. Fix: {fix}."
        )


class UpdateMismatchError(RayZeroCopyError, ValueError):
    """A new version's tensors do not match the loaded model's (names, shapes, dtypes or ties); the model
    was not changed (``update_model_in_actor`` checks every tensor before it writes any).

    Attributes:
        missing: tensors of the loaded model that the new version lacks.
        unexpected: tensors of the new version that the loaded model lacks.
        mismatched: ``(name, (loaded dtype, shape), (new dtype, shape))`` of tensors that differ, and
            tensors tied in the loaded model but not in the new version (shape given as "untied").
    """

    def __init__(self, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[str, tuple], tuple[str, tuple]]], where: str = "actor") -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        base = "the loaded model" if where == "actor" else "the previous version (like=)"
        lines = [f"in {base} but not in the new version: {n}" for n in missing]
        lines += [f"in the new version but not in {base}: {n}" for n in unexpected]
        lines += [f"{n}: the loaded model has {m[0]}{list(m[1])}, the new version {c[0]}{list(c[1])}"
                  for n, m, c in mismatched]
        shown = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
        kept = "the model keeps its previous weights" if where == "actor" else "nothing was stored (prepare ran in the driver)"
        super().__init__(
            f"the new weights do not fit the loaded model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} mismatched); {kept}:\n  {shown}\nFix: prepare the new version from a model of "
            "the same class and config, in the dtype the actors loaded (or load with dtype=); a model whose "
            "architecture changed needs a new load (load_model_in_actor) or new actors, not an update."
        )


class UpdateNotSupportedError(RayZeroCopyError, NotImplementedError):
    """The loaded model cannot take a live update in this form (one of a pipeline's models prepared together,
    loaded with ``share_gpu=True``); it was not changed."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"update_model_in_actor: {problem}; the model keeps its previous weights. Fix: {fix}")
