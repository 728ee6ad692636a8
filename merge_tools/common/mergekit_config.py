"""mergekit configurations: the YAML, its model references, and what mergekit refuses in it
from the YAML alone."""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_tools.common.errors import CliError
from merge_tools.common.sources import split_revision


def read_mergekit_config(path: Path) -> Any:
    import yaml

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}): save it as UTF-8") from exc
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CliError(f"{path}: not valid YAML ({where}{problem})") from exc
    except RecursionError as exc:
        raise CliError(f"{path}: nested too deeply to be a mergekit configuration") from exc
    if not isinstance(config, dict):
        raise CliError(f"{path}: not a mergekit configuration (the top level must be a mapping, got {type(config).__name__})")
    return config


@dataclass(frozen=True)
class ModelRef:
    """A model of a mergekit configuration: `path[@revision][+lora]`."""

    path: str
    revision: str | None = None
    lora: str | None = None

    def __str__(self) -> str:
        text = f"{self.path}@{self.revision}" if self.revision else self.path
        return f"{text}+{self.lora}" if self.lora else text


def parse_model_reference(value: Any) -> ModelRef:
    """A mergekit model reference, as a string (`path@rev+lora`) or its dict form."""
    if isinstance(value, Mapping):
        model, lora = value.get("model"), value.get("lora")
        if isinstance(model, Mapping):
            path, revision = model.get("path"), model.get("revision")
        else:
            path, revision = split_revision(str(model)) if model is not None else (None, None)
        if isinstance(lora, Mapping):
            lora = lora.get("path")
        if not path:
            raise CliError(f"cannot read the model reference {value!r}")
        return ModelRef(str(path), revision, str(lora) if lora else None)
    if not isinstance(value, str) or not value:
        raise CliError(f"cannot read the model reference {value!r}")
    model_part, _, lora = value.partition("+")
    path, revision = split_revision(model_part)
    return ModelRef(path, revision, lora or None)


def map_model_references(config: Any, change: Callable[[Any], Any], where: object = "the mergekit configuration") -> dict[str, Any]:
    """A copy of a mergekit configuration with every model reference replaced by
    change(reference): models[].model, slices[].sources[].model, slices[].base_model,
    base_model, and the same inside modules. Errors name `where` (the YAML file)."""
    if not isinstance(config, Mapping):
        raise CliError(f"{where}: not a mergekit configuration: the YAML top level must be a mapping")

    def block(part: Mapping[str, Any]) -> dict[str, Any]:
        result = dict(part)
        if part.get("models") is not None:
            if not isinstance(part["models"], list):
                raise CliError(f"{where}: models: must be a list of {{model: ...}} entries")
            result["models"] = []
            for entry in part["models"]:
                if not isinstance(entry, Mapping) or "model" not in entry:
                    raise CliError(f"{where}: models[] entry without a 'model' key: {entry!r}")
                result["models"].append({**entry, "model": change(entry["model"])})
        if part.get("slices") is not None:
            if not isinstance(part["slices"], list):
                raise CliError(f"{where}: slices: must be a list")
            result["slices"] = []
            for slice_ in part["slices"]:
                if not isinstance(slice_, Mapping) or not isinstance(slice_.get("sources"), list):
                    raise CliError(f"{where}: slices[] entry without a list of sources: {slice_!r}")
                sources = []
                for source in slice_["sources"]:
                    if not isinstance(source, Mapping) or "model" not in source:
                        raise CliError(f"{where}: slices[].sources[] entry without a 'model' key: {source!r}")
                    sources.append({**source, "model": change(source["model"])})
                new_slice = {**slice_, "sources": sources}
                if slice_.get("base_model") is not None:
                    new_slice["base_model"] = change(slice_["base_model"])
                result["slices"].append(new_slice)
        if part.get("base_model") is not None:
            result["base_model"] = change(part["base_model"])
        return result

    result = block(config)
    if config.get("modules") is not None:
        if not isinstance(config["modules"], Mapping):
            raise CliError(f"{where}: modules: must be a mapping of name -> {{models|slices}}")
        result["modules"] = {name: block(module) for name, module in config["modules"].items()}
    if not any(result.get(key) for key in ("models", "slices", "modules")):
        raise CliError(f"{where}: names no models (expected models:, slices: or modules:)")
    return result


def mergekit_references(config: Any, where: object = "the mergekit configuration") -> list[Any]:
    """Every model reference of a mergekit configuration in order of appearance, base_model
    first (references repeat where the YAML repeats them)."""
    found: list[Any] = []

    def record(reference: Any) -> Any:
        found.append(reference)
        return reference

    map_model_references(config, record, where)
    base = config.get("base_model")
    return ([base] if base is not None else []) + found


def local_or_hub(ref: ModelRef, yaml_dir: Path) -> str:
    """A model path as mergekit resolves it: against the working directory (else a Hub
    repo id). A relative path found only next to the YAML is an error, which says how to
    run: mergekit, started from here, would not find it."""
    path = Path(ref.path).expanduser()
    if path.exists():
        return str(path.resolve())
    beside = yaml_dir / ref.path
    if not path.is_absolute() and beside.exists():
        raise CliError(
            f"{ref.path}: not in the working directory {Path.cwd()}, only next to the YAML ({beside}); mergekit resolves "
            f"model paths against the working directory: run from {yaml_dir} (cd there first) or write the absolute path"
        )
    return ref.path


# mergekit 0.1.5's merge methods: name -> (what it does with base_model: required,
# optional or ignored; its parameters without a default, as (name, scope): `input` for every
# model, `non_base` for every model but the base, `shared` once). The gate validates with
# this table (importing mergekit means importing torch: seconds); the alignment asks the
# installed mergekit itself, and tests/test_mergekit_config.py checks the two agree.
MERGEKIT_METHODS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "linear": ("ignored", (("weight", "input"),)),
    "slerp": ("required", (("t", "shared"),)),
    "nuslerp": ("optional", (("weight", "non_base"),)),
    "multislerp": ("optional", (("weight", "non_base"),)),
    "nearswap": ("required", (("t", "shared"),)),
    "ram": ("required", ()),
    "ramplus_tl": ("required", ()),
    "sce": ("required", ()),
    "passthrough": ("ignored", ()),
    "model_stock": ("required", ()),
    "arcee_fusion": ("required", ()),
    "karcher": ("ignored", ()),
    **{
        name: ("required", (("weight", "non_base"),))
        for name in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
    },
}


MERGEKIT_DTYPES = ("bfloat16", "float16", "float32", "float64", "int64")  # mergekit.common.dtype_from_name ("torch." prefix allowed)


def installed_mergekit_methods() -> dict[str, tuple[str, tuple[tuple[str, str], ...]]] | None:
    """MERGEKIT_METHODS as the installed mergekit's registry has them, None without mergekit."""

    if importlib.util.find_spec("mergekit") is None:
        return None
    from mergekit.merge_methods import registry

    return {
        method.spec.name: (method.spec.contract.base.value, tuple((p.name, p.scope.value) for p in method.spec.parameters if p.required))
        for method in registry.registered_methods()
    }


def mergekit_config_problems(config: Mapping[str, Any], methods: Mapping[str, tuple[str, tuple[tuple[str, str], ...]]]) -> list[str]:
    """What mergekit refuses in a configuration, from the YAML alone: an unknown
    merge_method (with the name it was likely meant to be), a base_model the method needs,
    a parameter without a default that no model gives, an unknown dtype, a model listed twice."""
    problems = []
    method = config.get("merge_method")
    if not isinstance(method, str) or method not in methods:
        close = difflib.get_close_matches(str(method).lower().replace("-", "_").replace(" ", "_"), list(methods), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else f" (mergekit's methods: {', '.join(sorted(methods))})"
        return [f"merge_method {method!r} is not a mergekit merge method{hint}"]
    base_policy, required = methods[method]
    if base_policy == "required" and config.get("base_model") is None:
        problems.append(f"merge_method {method} needs a base_model, and the configuration names none")
    for key in ("dtype", "out_dtype"):
        value = config.get(key)
        if value is not None and str(value).removeprefix("torch.") not in MERGEKIT_DTYPES:
            problems.append(f"{key} {value!r} is not one mergekit knows ({', '.join(MERGEKIT_DTYPES)})")
    if config.get("tokenizer_source") is not None and config.get("tokenizer") is not None:
        problems.append("tokenizer_source and tokenizer: are both given (mergekit: 'Cannot specify both'); keep one")
    models = config.get("models") if isinstance(config.get("models"), list) else []
    base = model_identity(config["base_model"]) if config.get("base_model") is not None else None
    shared = config.get("parameters") if isinstance(config.get("parameters"), Mapping) else {}
    seen: set[str] = set()
    for index, entry in enumerate(models):
        if not isinstance(entry, Mapping) or entry.get("model") is None:
            continue
        identity = model_identity(entry["model"])
        if identity in seen:
            problems.append(f"models[{index}]: {parse_model_reference(entry['model'])} is listed twice")
        seen.add(identity)
        given = entry.get("parameters") if isinstance(entry.get("parameters"), Mapping) else {}
        for name, scope in required:
            applies = scope == "input" or (scope == "non_base" and identity != base)
            if applies and name not in given and name not in shared:
                problems.append(f"models[{index}]: merge_method {method} needs parameters: {{{name}: ...}} for this model")
    for name, scope in required:
        if (
            scope == "shared"
            and name not in shared
            and not any(isinstance(e, Mapping) and name in (e.get("parameters") or {}) for e in models)
        ):
            problems.append(f"merge_method {method} needs parameters: {{{name}: ...}}")
    return problems


def model_identity(reference: Any) -> str:
    """A model reference as mergekit tells models apart: path, revision and LoRA as written
    (two spellings of one folder are two inputs to it; the same spelling twice is a duplicate)."""
    return str(parse_model_reference(reference))
