"""Do the peers' own loaders compute what our transcoders compute, and ours what theirs do?

For sparsify (eai-sparsify 1.3.3), SAELens (sae-lens 6.54.0) and circuit-tracer (0.5.0), each in a
throwaway virtual environment (pinned CPU torch first; circuit-tracer needs nnsight < 0.8, so it gets
its own), and for every kind and activation each format can hold:

- **ours -> theirs**: a random transcoder of ours (with non-unit input/output scales) saved with
  ``save(format=...)`` and loaded by the peer's own loader (``SparseCoder.load_many``,
  ``SAE.load_from_disk``, ``load_transcoder_set``) gives the same encode, decode and forward;
- **theirs -> ours**: a random coder built and saved by the peer's own classes (``save_to_disk``,
  ``save_model``, ``TranscoderSet.to_safetensors``; a Gemma Scope ``params.npz`` read by circuit-tracer's
  ``load_gemma_scope_transcoder``) loaded by `load_transcoders` gives the same.

Differences are max |ours - theirs| over 256 random inputs, relative to the largest |value| of that
output (pass: <= 1e-4). Then, unless ``--no-frontend``, a graph attributed on the default model with
circuit-tracer-format transcoders is saved with ``graph.save(folder, format="circuit-tracer")`` and served
by circuit-tracer's own server; the nodes its frontend draws in Chromium are counted
(``bench/circuit_tracer_frontend.py``).

    python bench/interop.py [--venvs /tmp/tcw-interop-venvs] [--python PEER=PATH ...] [--no-frontend]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tcwidgets as tcw  # noqa: E402

D, N, K, LAYER = 64, 256, 8, 3
#: peer -> what its virtual environment installs after torch
PEERS = {
    "sparsify": ["eai-sparsify==1.3.3"],
    "saelens": ["sae-lens==6.54.0"],
    "circuit-tracer": ["circuit-tracer==0.5.0", "nnsight==0.6.3", "transformers<=4.57.3"],
}
#: format -> the (kind, activation) pairs it holds
HELD = {
    "sparsify": [("transcoder", "topk"), ("skip", "topk"), ("sae", "topk")],
    "saelens": [(kind, act) for kind in ("transcoder", "skip") for act in ("relu", "jumprelu", "batchtopk")]
    + [("sae", act) for act in ("relu", "jumprelu", "topk", "batchtopk")],
    "circuit-tracer": [(kind, act) for kind in ("transcoder", "skip") for act in ("relu", "jumprelu", "batchtopk")],
}

PEER_SCRIPTS = {
    "sparsify": """
from sparsify import SparseCoder
from sparsify.config import SparseCoderConfig

def run(coder, name):
    enc = coder.encode(x)
    latents = torch.zeros(len(x), coder.num_latents).scatter(1, enc.top_indices, enc.top_acts.float())
    decoded = coder.decode(enc.top_acts, enc.top_indices)
    if coder.W_skip is not None:
        decoded = decoded + x @ coder.W_skip.mT
    results.update({f"{name}.encode": latents, f"{name}.decode": decoded, f"{name}.forward": coder(x).sae_out})

for case in cases:
    (coder,) = SparseCoder.load_many(case["folder"], local=True).values()
    run(coder, case["name"])
for kind, options in {"transcoder": dict(transcode=True), "skip": dict(transcode=True, skip_connection=True),
                      "sae": {}}.items():
    coder = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K, **options))
    randomize(coder)
    coder.save_to_disk(work / "theirs" / f"sparsify-{kind}-topk" / "layers.3.mlp")
    run(coder, f"theirs.sparsify-{kind}-topk")
""",
    "saelens": """
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.saes.transcoder import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, JumpReLUTranscoder,
                                      JumpReLUTranscoderConfig, SkipTranscoder, SkipTranscoderConfig, Transcoder,
                                      TranscoderConfig)

def run(sae, name):
    latents = sae.encode(x)
    decoded = sae.decode(latents)
    if getattr(sae, "W_skip", None) is not None:
        decoded = decoded + x @ sae.W_skip.T
    results.update({f"{name}.encode": latents, f"{name}.decode": decoded, f"{name}.forward": sae(x)})

for case in cases:
    run(SAE.load_from_disk(case["folder"]), case["name"])
sae_meta = lambda: SAEMetadata(model_name="gpt2", hook_name="blocks.3.hook_mlp_out")
tc_meta = lambda: SAEMetadata(model_name="gpt2", hook_name="blocks.3.ln2.hook_normalized",
                              hook_name_out="blocks.3.hook_mlp_out")
theirs = {
    "sae-relu": StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=True, metadata=sae_meta())),
    "sae-jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=True, metadata=sae_meta())),
    "sae-topk": TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=True, metadata=sae_meta())),
    "transcoder-relu": Transcoder(TranscoderConfig(d_in=D, d_sae=N, d_out=D, apply_b_dec_to_input=False,
                                                   metadata=tc_meta())),
    "skip-relu": SkipTranscoder(SkipTranscoderConfig(d_in=D, d_sae=N, d_out=D, apply_b_dec_to_input=False,
                                                     metadata=tc_meta())),
    "transcoder-jumprelu": JumpReLUTranscoder(JumpReLUTranscoderConfig(d_in=D, d_sae=N, d_out=D,
                                                                       apply_b_dec_to_input=False, metadata=tc_meta())),
    "skip-jumprelu": JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(d_in=D, d_sae=N, d_out=D,
                                                                         apply_b_dec_to_input=False,
                                                                         metadata=tc_meta())),
}
for name, sae in theirs.items():
    randomize(sae)
    if hasattr(sae, "threshold"):
        sae.threshold.data = sae.threshold.data.abs()
    sae.save_model(work / "theirs" / f"saelens-{name}")
    run(sae, f"theirs.saelens-{name}")
""",
    "circuit-tracer": """
import numpy as np
import torch.nn.functional as F
import yaml
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.single_layer_transcoder import (SingleLayerTranscoder, TranscoderSet,
                                                               load_gemma_scope_transcoder, load_transcoder_set)

def run(transcoder, name):
    latents = transcoder.encode(x)
    results.update({f"{name}.encode": latents, f"{name}.decode": transcoder.decode(latents, x),
                    f"{name}.forward": transcoder(x)})

cpu = torch.device("cpu")
for case in cases:
    folder = Path(case["folder"])
    config = yaml.safe_load((folder / "config.yaml").read_text())
    paths = {i: str(folder / name) for i, name in enumerate(config["transcoders"])}
    transcoder_set = load_transcoder_set(paths, scan=config["scan"], feature_input_hook=config["feature_input_hook"],
                                         feature_output_hook=config["feature_output_hook"], device=cpu,
                                         dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    run(transcoder_set[case["layer"]], case["name"])
for kind in ("transcoder", "skip"):
    for activation in ("relu", "jumprelu"):
        def make(layer):
            function = JumpReLU(torch.rand(N) * 0.2, 0.1) if activation == "jumprelu" else F.relu
            return SingleLayerTranscoder(D, N, function, layer, skip_connection=kind == "skip", device=cpu,
                                         dtype=torch.float32)
        transcoders = {layer: make(layer) for layer in range(LAYER + 1)}
        for transcoder in transcoders.values():
            randomize(transcoder)
            if activation == "jumprelu":  # positive, as trained ones are (a negative one is refused: see docs)
                transcoder.activation_function.threshold.data.abs_()
        name = f"circuit-tracer-{kind}-{activation}"
        folder = work / "theirs" / name
        TranscoderSet(transcoders, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out",
                      scan=name).to_safetensors(str(folder))
        (folder / "config.yaml").write_text(yaml.dump({"model_kind": "transcoder_set", "model_name": "gpt2",
                                                       "feature_input_hook": "mlp.hook_in",
                                                       "feature_output_hook": "mlp.hook_out", "scan": name}))
        run(transcoders[LAYER], f"theirs.{name}")
folder = work / "theirs" / "gemma-scope-2b-pt-transcoders" / f"layer_{LAYER}" / "width_16k" / "average_l0_20"
folder.mkdir(parents=True)
generator = np.random.default_rng(0)
np.savez(folder / "params.npz", W_enc=generator.normal(size=(D, N)).astype(np.float32) / 8,
         W_dec=generator.normal(size=(N, D)).astype(np.float32) / 8, b_enc=generator.normal(size=N).astype(np.float32) / 8,
         b_dec=generator.normal(size=D).astype(np.float32) / 8, threshold=np.abs(generator.normal(size=N)).astype(np.float32) / 8)
run(load_gemma_scope_transcoder(str(folder / "params.npz"), LAYER, device=cpu), "theirs.gemma-scope-2b-pt-transcoders")
""",
}

PRELUDE = """
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
torch.manual_seed(1)
work = Path(sys.argv[1])
D, N, K, LAYER = {D}, {N}, {K}, {LAYER}
x = load_file(work / "x.safetensors")["x"]
cases = json.loads((work / "cases.json").read_text())
results = {{}}

def randomize(module):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) / 8)
"""
EPILOGUE = """
save_file({name: t.detach().float().contiguous() for name, t in results.items()}, work / "results.safetensors")
"""


def peer_python(peer: str, venvs: Path) -> str:
    """The Python of the peer's virtual environment, made (torch first, pinned) if missing."""
    python = venvs / peer / "bin" / "python"
    if not python.exists():
        print(f"installing {' '.join(PEERS[peer])} into {venvs / peer} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venvs / peer)], check=True)
        for packages in (["torch==2.13.0"], PEERS[peer]):
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    return str(python)


def random_transcoder(kind: str, activation: str) -> tcw.Transcoder:
    config = tcw.TranscoderConfig(d_in=D, d_out=D, n_latents=N, kind=kind, activation=activation,
                                  k=K if activation in ("topk", "batchtopk") else None, input_scale=1.7,
                                  output_scale=0.6, site={"model": "smollm2-135m", "layer": LAYER,
                                                          "input": f"model.layers.{LAYER}.mlp.input",
                                                          "output": f"model.layers.{LAYER}.mlp.output"})
    tc = tcw.Transcoder(config)
    with torch.no_grad():
        for parameter in tc.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
        if activation == "jumprelu":
            tc.log_threshold.copy_(torch.randn(N) * 0.3 - 1.5)
        if activation == "batchtopk":
            tc.threshold.fill_(0.5)
    return tc.eval()


def ours(tc: tcw.Transcoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        latents = tc.encode(x)
        return {"encode": latents, "decode": tc.decode(latents, x), "forward": tc(x).output}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run_peer(peer: str, python: str, work: Path, x: torch.Tensor) -> list[dict]:
    """Export ours for ``peer``, run its script, compare both directions; one row per case."""
    work.mkdir(parents=True)
    save_file({"x": x}, work / "x.safetensors")
    cases, expected = [], {}
    for kind, activation in HELD[peer]:
        tc = random_transcoder(kind, activation)
        name = f"ours.{peer}-{kind}-{activation}"
        tc.save(work / name, format=peer)
        cases.append({"name": name, "folder": str(work / name), "layer": LAYER, "kind": kind, "activation": activation})
        expected[name] = ours(tc, x)
    (work / "cases.json").write_text(json.dumps(cases))
    script = PRELUDE.format(D=D, N=N, K=K, LAYER=LAYER) + textwrap.dedent(PEER_SCRIPTS[peer]) + EPILOGUE
    subprocess.run([python, "-c", script, str(work)], check=True)
    results = load_file(work / "results.safetensors")
    rows = []
    for case in cases:
        theirs = {step: results[f"{case['name']}.{step}"] for step in ("encode", "decode", "forward")}
        rows.append(_row(peer, case["kind"], case["activation"], "ours -> theirs", expected[case["name"]], theirs))
    for folder in sorted((work / "theirs").iterdir()):
        tc = tcw.load_transcoders(folder)[LAYER]
        theirs = {step: results[f"theirs.{folder.name}.{step}"] for step in ("encode", "decode", "forward")}
        if folder.name.startswith("gemma-scope"):
            format, activation = "Gemma Scope npz", "jumprelu"
        else:
            format = peer
            activation = folder.name.rsplit("-", 1)[1]
        rows.append(_row(format, tc.config.kind, activation, "theirs -> ours", ours(tc, x), theirs))
    return rows


def _row(format: str, kind: str, activation: str, direction: str, ours_: dict, theirs: dict) -> dict:
    diffs = {step: relative(theirs[step], ours_[step]) for step in ("encode", "decode", "forward")}
    return {"format": format, "kind": kind, "activation": activation, "direction": direction, **diffs,
            "ok": max(diffs.values()) <= 1e-4}


def frontend(python: str, work: Path) -> dict:
    """Attribute a graph on the default model with transcoders loaded from a circuit-tracer set, export it
    for circuit-tracer and count the nodes its own frontend draws."""
    from circuit_tracer_frontend import count_rendered

    lm = tcw.load_model()
    corpus = tcw.load_corpus("python-docs", lm, context=32, n_tokens=32 * 64)
    store = tcw.collect_activations(lm, [2, 3], corpus, progress=False)
    trained = {layer: tcw.train_transcoder(store, layer, n_latents=512, activation="jumprelu", progress=False)
               for layer in (2, 3)}
    tcw.save_transcoders(trained, work / "set", format="circuit-tracer", n_layers=lm.n_layers)
    transcoders = tcw.load_transcoders(work / "set")
    graph = tcw.attribute(lm, transcoders, "def add(a, b):\n    return a +", tcw.LogitTarget(" b"))
    graph.save(work / "graph", format="circuit-tracer", slug="tcwidgets-bench")
    return count_rendered(python, work / "graph", slug="tcwidgets-bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venvs", type=Path, default=Path("/tmp/tcw-interop-venvs"),
                        help="where the peers' virtual environments are made (kept between runs)")
    parser.add_argument("--python", action="append", default=[], metavar="PEER=PATH",
                        help="use an existing environment's Python for a peer (e.g. circuit-tracer=/tmp/ct-venv/bin/python)")
    parser.add_argument("--no-frontend", action="store_true", help="skip the circuit-tracer frontend check")
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.python)
    pythons = {peer: given.get(peer) or peer_python(peer, args.venvs) for peer in PEERS}
    torch.manual_seed(0)
    x = torch.randn(256, D)
    rows, drawn_all = [], True
    with tempfile.TemporaryDirectory(prefix="tcw-interop-") as work:
        for peer in PEERS:
            rows += run_peer(peer, pythons[peer], Path(work) / peer, x)
        print(f"\n| format | kind | activation | direction | encode | decode | forward | ok |\n|{'---|' * 8}")
        for row in rows:
            print(f"| {row['format']} | {row['kind']} | {row['activation']} | {row['direction']} | "
                  f"{row['encode']:.1e} | {row['decode']:.1e} | {row['forward']:.1e} | {'yes' if row['ok'] else 'NO'} |")
        if not args.no_frontend:
            result = frontend(pythons["circuit-tracer"], Path(work) / "frontend")
            print(f"\ncircuit-tracer's frontend drew {result['rendered']} of {result['exported']} nodes of our "
                  f"exported graph; page errors: {result['errors'] or 'none'}")
            drawn_all = result["rendered"] == result["exported"] and not result["errors"]
    sys.exit(0 if all(row["ok"] for row in rows) and drawn_all else 1)


if __name__ == "__main__":
    main()
