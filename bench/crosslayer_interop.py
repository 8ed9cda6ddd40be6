"""Does circuit-tracer's own ``load_clt`` compute what our cross-layer transcoders compute, and ours what
its ``CrossLayerTranscoder`` does?

In circuit-tracer 0.5.0's virtual environment (made as `bench/interop.py` makes it), for ReLU and JumpReLU:

- **ours -> theirs**: a random CLT of ours on model layers 1 and 3 (non-unit scales, cross-layer writes)
  saved with ``save(format="circuit-tracer", n_layers=5)`` and read by ``load_clt``: its per-layer
  ``encode_layer`` and ``decode`` (the reconstruction at every layer) against ours;
- **theirs -> ours**: a random ``CrossLayerTranscoder`` of circuit-tracer over 4 layers written with its
  ``to_safetensors`` and read by `load_transcoders`.

Differences are max |ours - theirs| over 64 random inputs per layer, relative to the largest |value| of
that output (pass: <= 1e-4).

    python bench/crosslayer_interop.py [--venvs /tmp/tcw-interop-venvs] [--python /tmp/ct-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tcwidgets as tcw  # noqa: E402
from interop import peer_python, relative  # noqa: E402
from tcwidgets.crosslayer import CrossLayerConfig  # noqa: E402

D, N, OURS_LAYERS, OURS_N_LAYERS, THEIR_N_LAYERS = 32, 48, [1, 3], 5, 4

SCRIPT = """
import json, sys
from pathlib import Path
import torch
import yaml
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt

work = Path(sys.argv[1])
cases = json.loads((work / "cases.json").read_text())
cpu, results = torch.device("cpu"), {}

def run(clt, name, x):
    latents = torch.stack([clt.encode_layer(x[i], i) for i in range(clt.n_layers)])
    results[f"{name}.encode"] = latents
    results[f"{name}.decode"] = clt.decode(latents.to_sparse())

for case in cases:
    clt = load_clt(case["folder"], device=cpu, dtype=torch.float32, lazy_decoder=False)
    run(clt, case["name"], load_file(work / "x_ours.safetensors")["x"])
torch.manual_seed(1)
for activation in ("relu", "jump_relu"):
    clt = CrossLayerTranscoder(N_LAYERS, N, D, activation_function=activation, lazy_decoder=False,
                               device=cpu, dtype=torch.float32)
    with torch.no_grad():
        for parameter in clt.parameters():
            parameter.copy_(torch.randn_like(parameter) / 4)
        if activation == "jump_relu":
            clt.activation_function.threshold.copy_(torch.rand_like(clt.activation_function.threshold) / 4)
    name = f"theirs-{activation}"
    clt.to_safetensors(str(work / name))
    (work / name / "config.yaml").write_text(yaml.dump({"model_kind": "cross_layer_transcoder", "model_name": "gpt2",
        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out", "scan": name}))
    run(clt, name, load_file(work / "x_theirs.safetensors")["x"])
save_file({name: t.detach().float().contiguous() for name, t in results.items()}, work / "results.safetensors")
"""


def random_clt(activation: str) -> tcw.CrossLayerTranscoder:
    clt = tcw.CrossLayerTranscoder(CrossLayerConfig(
        d_model=D, n_latents=N, layers=OURS_LAYERS, activation=activation, input_scales=[1.7, 0.8],
        output_scales=[0.6, 1.3], model="smollm2-135m"))
    with torch.no_grad():
        for parameter in clt.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
        if activation == "jumprelu":
            clt.log_threshold.copy_(torch.randn_like(clt.log_threshold) * 0.3 - 1.5)
    return clt.eval()


def compare(ours_latents: list[torch.Tensor], ours_outputs: list[torch.Tensor], results: dict, name: str,
            layers: list[int]) -> dict[str, float]:
    """Max relative differences of the latents and outputs at ``layers`` (indices into their stacks)."""
    theirs_latents, theirs_outputs = results[f"{name}.encode"], results[f"{name}.decode"]
    return {"encode": max(relative(ours, theirs_latents[layer]) for ours, layer in zip(ours_latents, layers)),
            "decode": max(relative(ours, theirs_outputs[layer]) for ours, layer in zip(ours_outputs, layers))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venvs", type=Path, default=Path("/tmp/tcw-interop-venvs"))
    parser.add_argument("--python", help="circuit-tracer's environment's Python (e.g. /tmp/ct-venv/bin/python)")
    args = parser.parse_args()
    python = args.python or peer_python("circuit-tracer", args.venvs)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcw-clt-interop-") as work:
        work = Path(work)
        x_ours, x_theirs = torch.randn(OURS_N_LAYERS, 64, D), torch.randn(THEIR_N_LAYERS, 64, D)
        save_file({"x": x_ours}, work / "x_ours.safetensors")
        save_file({"x": x_theirs}, work / "x_theirs.safetensors")
        cases, ours = [], {}
        for activation in ("relu", "jumprelu"):
            clt = random_clt(activation)
            name = f"ours-{activation}"
            clt.save(work / name, format="circuit-tracer", n_layers=OURS_N_LAYERS)
            cases.append({"name": name, "folder": str(work / name)})
            with torch.no_grad():
                ours[name] = clt([x_ours[layer] for layer in OURS_LAYERS])
        (work / "cases.json").write_text(json.dumps(cases))
        script = f"N_LAYERS, N, D = {THEIR_N_LAYERS}, {N}, {D}\n" + SCRIPT
        subprocess.run([python, "-c", script, str(work)], check=True)
        results = load_file(work / "results.safetensors")
        for name, (latents, outputs) in ours.items():
            rows.append({"case": name, "direction": "ours -> theirs",
                         **compare(latents, outputs, results, name, OURS_LAYERS)})
        for activation in ("relu", "jump_relu"):
            name = f"theirs-{activation}"
            clt = tcw.load_transcoders(work / name)
            with torch.no_grad():
                latents, outputs = clt(list(x_theirs))
            rows.append({"case": name, "direction": "theirs -> ours",
                         **compare(latents, outputs, results, name, list(range(THEIR_N_LAYERS)))})
    print(f"\n| case | direction | encode | decode | ok |\n|{'---|' * 5}")
    for row in rows:
        row["ok"] = max(row["encode"], row["decode"]) <= 1e-4
        print(f"| {row['case']} | {row['direction']} | {row['encode']:.1e} | {row['decode']:.1e} | "
              f"{'yes' if row['ok'] else 'NO'} |")
    sys.exit(0 if all(row["ok"] for row in rows) else 1)


if __name__ == "__main__":
    main()
