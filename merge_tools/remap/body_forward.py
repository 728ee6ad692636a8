"""A model's body run on a few hundred windows of text with one layer in memory at a time
(the calibration of --init auto): the transformers class built on the meta device, every
module's weights read from the checkpoint just before it runs and dropped just after."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from merge_tools.common.errors import CliError
from merge_tools.remap.checkpoints import read_matrix
from merge_tools.remap.row_math import decode_rows

if TYPE_CHECKING:
    from merge_tools.remap.checkpoints import Checkpoint


class BodyUnavailable(Exception):
    """The body cannot be run here (an architecture transformers does not know, weights
    in a dtype numpy cannot decode, names the checkpoint does not hold): the calibration
    is skipped, with this reason in the report."""


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter created inside lands on the meta device (no memory, no init);
    buffers stay real (rotary frequencies, embedding scales are computed at construction)."""
    import torch

    register = torch.nn.Module.register_parameter

    def register_on_meta(module: Any, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_body(model_dir: Path, trust_remote_code: bool) -> tuple[Any, str, Any]:
    """(the body module, its name in the checkpoint's keys, the config) of the model's
    causal-LM class, its parameters on the meta device."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with parameters_on_meta(), torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # an architecture or a config transformers cannot build
        raise BodyUnavailable(f"transformers cannot build {model_dir.name}'s model class: {exc}") from exc
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if body is None or body is model:
        raise BodyUnavailable(f"{type(model).__name__} has no separate body (base_model_prefix {prefix!r})")
    return body.eval(), prefix, config


def tensor_from_checkpoint(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> Any:
    """A checkpoint tensor as float32 torch (read into memory, not mapped)."""
    import torch

    entry = ckpt.tensors.get(name)
    if entry is None:
        raise BodyUnavailable(f"the checkpoint has no tensor {name}")
    if tuple(entry.shape) != tuple(shape):
        raise BodyUnavailable(f"{name} is {list(entry.shape)} in the checkpoint, {list(shape)} in the model class")
    rows = entry.shape[0] if entry.shape else 1
    try:
        values = decode_rows(read_matrix(ckpt, entry, rows).reshape(rows, -1), entry.dtype)
    except CliError as exc:
        raise BodyUnavailable(f"{name}: {exc}") from exc
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a copy: the matrix read is read-only


class StreamedBody:
    """The body with hooks: each module's own parameters are read from the checkpoint
    before its forward and put back on the meta device after it, so memory holds one
    layer's weights (plus the activations). The input embedding is not read: the caller
    gives its rows (`embedding_rows`), indexed by the ids it passes."""

    def __init__(self, body: Any, prefix: str, ckpt: Checkpoint, embed_name: str, skip: frozenset[str], device: str = "cpu") -> None:
        self.body, self.prefix, self.ckpt, self.device = body, prefix, ckpt, device
        self.embedding_rows: Any = None
        self.embedding = body.get_input_embeddings()
        self.handles = []
        for module_name, module in body.named_modules():
            own = [name for name, value in module._parameters.items() if value is not None]
            if not own:
                continue
            names = {name: self.checkpoint_name(module_name, name) for name in own}
            if module is self.embedding:
                if set(names.values()) - {embed_name}:
                    raise BodyUnavailable(f"the input embedding holds more than {embed_name}")
                self.handles.append(module.register_forward_pre_hook(self.load_embedding))
            else:
                read = sorted(set(names.values()) & skip)
                if read:
                    raise BodyUnavailable(f"the body reads the vocabulary tensor {read[0]}, which the remap rewrites")
                self.handles.append(module.register_forward_pre_hook(self.loader(names)))
            self.handles.append(module.register_forward_hook(self.unloader(own)))

    def checkpoint_name(self, module_name: str, param: str) -> str:
        local = f"{module_name}.{param}" if module_name else param
        for name in (f"{self.prefix}.{local}", local):
            if name in self.ckpt.tensors:
                return name
        return f"{self.prefix}.{local}"

    def loader(self, names: Mapping[str, str]) -> Callable[[Any, Any], None]:
        import torch

        def load(module: Any, _inputs: Any) -> None:
            for param, name in names.items():
                value = tensor_from_checkpoint(self.ckpt, name, tuple(module._parameters[param].shape)).to(self.device)
                module._parameters[param] = torch.nn.Parameter(value, requires_grad=False)

        return load

    def load_embedding(self, module: Any, _inputs: Any) -> None:
        import torch

        module._parameters["weight"] = torch.nn.Parameter(self.embedding_rows.to(self.device), requires_grad=False)

    @staticmethod
    def unloader(own: list[str]) -> Callable[[Any, Any, Any], None]:
        import torch

        def unload(module: Any, _inputs: Any, _output: Any) -> None:
            for param in own:
                module._parameters[param] = torch.nn.Parameter(module._parameters[param].to("meta"), requires_grad=False)

        return unload

    def last_hidden(self, ids: np.ndarray, embedding_rows: Any) -> Any:
        """The body's last hidden states (after its final norm) for a batch of windows
        `ids` (batch, length), whose ids index `embedding_rows`; float32 on the CPU."""
        import torch

        self.embedding_rows = embedding_rows
        try:
            with torch.no_grad():
                output = self.body(input_ids=torch.as_tensor(ids, device=self.device), use_cache=False)
        except BodyUnavailable:
            raise
        except Exception as exc:  # a model class whose forward needs what this loop does not give
            raise BodyUnavailable(f"the body's forward failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.embedding_rows = None
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        return hidden.float().cpu()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def output_logit_transform(config: Any) -> tuple[float, float | None]:
    """(scale, softcap) the model's causal-LM head applies to H @ W^T: Cohere's
    logit_scale multiplies, Granite's logits_scaling divides, Gemma-2's
    final_logit_softcapping caps (cap * tanh(x / cap))."""
    text = getattr(config, "text_config", None) or config
    scale = float(getattr(text, "logit_scale", None) or 1.0)
    divisor = getattr(text, "logits_scaling", None)
    if divisor:
        scale /= float(divisor)
    cap = getattr(text, "final_logit_softcapping", None)
    return scale, float(cap) if cap else None
