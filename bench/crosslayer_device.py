"""CrossLayerTrainer on a GPU, on an in-memory store of synthetic activations: it learns, CUDA and CPU
runs agree, a run interrupted and resumed on the GPU ends where an uninterrupted one does, and the time
per step of a default-model-sized CLT (8 layers × 4608 latents, d = 576, batch 4096).

Runs where only torch, numpy, safetensors and tqdm are installed (the device machine's image): the
trainer never traces a model, so nnsight is stubbed and the package's ``__init__`` (widgets) skipped.

    python3 bench/crosslayer_device.py [cuda|cpu]
"""
import math, sys, time, types, tempfile, os
from pathlib import Path
stub = types.ModuleType("nnsight"); stub.TransformersModel = object; stub.save = lambda x: x
sys.modules["nnsight"] = stub
pkg = types.ModuleType("tcwidgets"); pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "tcwidgets")]
sys.modules["tcwidgets"] = pkg
import torch
from tcwidgets.crosslayer_training import CrossLayerTrainer, reconstruction_metrics
from tcwidgets.training import TrainingConfig


class Stats:
    def __init__(self, x, y):
        self.in_norm, self.out_norm = float(x.norm(dim=1).mean()), float(y.norm(dim=1).mean())


class FakeStore:
    model, identity = "fake", {"model": "fake", "n_tokens": 0}

    def __init__(self, layers, n_tokens, d, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.layers, self.n_tokens, self.d_model = list(layers), n_tokens, d
        x = torch.randn(n_tokens, d, generator=g)
        self.data = {}
        for layer in layers:
            w = torch.randn(d, d, generator=g) / math.sqrt(d)
            y = torch.relu(x @ w) @ torch.randn(d, d, generator=g) / math.sqrt(d)
            self.data[layer] = (x.clone(), y)
            x = x + y
        self.identity = {"model": "fake", "n_tokens": n_tokens}

    def check(self, model=None, layers=None):
        assert all(l in self.layers for l in layers or [])

    def stats(self, layer): return Stats(*self.data[layer])
    def sites(self, layer): return {"input": f"l{layer}.in", "output": f"l{layer}.out"}
    def verify(self, layers=None): pass
    def n_batches(self, batch_size, epochs=1, drop_last=True): return self.n_tokens // batch_size * epochs
    def sample(self, layer, n, seed=0): return next(self.batches(layer, min(n, self.n_tokens), seed=seed))

    def batches(self, layer, batch_size=1024, *, shuffle=True, seed=0, epochs=1, start=0, drop_last=True, part=(0, 1)):
        layers = [layer] if isinstance(layer, int) else list(layer)
        per = self.n_tokens // batch_size
        for epoch in range(start // per, epochs):
            order = torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for b in range(per):
                if epoch * per + b < start:
                    continue
                rows = order[b * batch_size:(b + 1) * batch_size]
                pairs = [(self.data[l][0][rows], self.data[l][1][rows]) for l in layers]
                yield pairs[0] if isinstance(layer, int) else pairs


def weights(m): return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
store = FakeStore([0, 1, 2], 4096, 64)
config = TrainingConfig(n_latents=256, k=8, batch_size=256, epochs=2, dead_window=256)
results = {}
for dev in ([device, "cpu"] if device != "cpu" else ["cpu"]):
    t = CrossLayerTrainer(store, [0, 1, 2], config, device=dev, log_every=4, progress=False)
    before = reconstruction_metrics(t.transcoder, store)
    clt = t.fit()
    after = reconstruction_metrics(clt, store)
    results[dev] = (weights(clt), t.history)
    print(dev, "fvu before", [round(before[l]["fvu"], 4) for l in before], "after", [round(after[l]["fvu"], 4) for l in after],
          "last record", {k: round(v, 4) for k, v in t.history[-1].items()})
if device != "cpu":
    a, b = results[device][1][-1]["fvu"], results["cpu"][1][-1]["fvu"]
    print("final training fvu cuda vs cpu", a, b)
    # resume on the device
    with tempfile.TemporaryDirectory() as d:
        class Stop(Exception): pass
        def stop(trainer, record):
            if trainer.step == 20: raise Stop
        try:
            CrossLayerTrainer(store, [0, 1, 2], config, device=device, checkpoint_dir=d, checkpoint_every=8,
                              log_every=4, callback=stop, progress=False).fit()
        except Stop:
            pass
        resumed = CrossLayerTrainer(store, [0, 1, 2], config, device=device, checkpoint_dir=d, checkpoint_every=8,
                                    log_every=4, progress=False)
        print("resumed at step", resumed.step)
        w = weights(resumed.fit())
        ref = results[device][0]
        print("resume on", device, "bit for bit:", all(torch.equal(w[k], ref[k]) for k in ref),
              "max diff", max(float((w[k] - ref[k]).abs().max()) for k in ref))
    # speed: default-model-sized CLT on 8 layers
    big = FakeStore(list(range(8)), 65536, 576, seed=1)
    for n in (4608,):
        t = CrossLayerTrainer(big, list(range(8)), TrainingConfig(n_latents=n, k=32, batch_size=4096), device=device,
                              log_every=1000, progress=False)
        xs = [big.data[l][0][:4096] for l in range(8)]
        x = torch.stack(xs).to(device); y = torch.stack([big.data[l][1][:4096] for l in range(8)]).to(device)
        for _ in range(3): t._train_step(x, y)
        torch.cuda.synchronize(); start = time.perf_counter()
        for _ in range(10): t._train_step(x, y)
        torch.cuda.synchronize()
        print(f"8 layers x {n} latents, d=576, batch 4096, k=32: {(time.perf_counter() - start) / 10 * 1000:.1f} ms/step, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
