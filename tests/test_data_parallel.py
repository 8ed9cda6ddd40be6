"""Data-parallel training of one layer with torchrun (DistributedDataParallel, gloo on CPU):
two processes, each on half of every batch, end with the weights of one process training on
the whole batches (up to floating-point summation order)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tcwidgets as tcw
from tcwidgets.training import Trainer, TrainingConfig
from tcwidgets.transcoder import Transcoder

CONFIG = dict(n_latents=256, k=8, batch_size=128, epochs=1)

WORKER = textwrap.dedent("""
    import json
    import sys
    from tcwidgets.activations import ActivationStore
    from tcwidgets.training import Trainer, TrainingConfig

    store_path, out, options = sys.argv[1], sys.argv[2], eval(sys.argv[3])
    trainer = Trainer(ActivationStore.open(store_path), 1, TrainingConfig(**options), data_parallel=True,
                      device="cpu", low_precision=False, progress=False)
    tc = trainer.fit()
    if trainer.rank == 0:
        tc.save(out)
        open(out + "/history.json", "w").write(json.dumps(trainer.history))
    import torch.distributed as dist
    dist.barrier()  # leave together: a process exiting with gloo's threads alive aborts
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def store(lm, tmp_path_factory):
    tokens = tcw.load_corpus("python-docs", lm, context=32, n_tokens=48 * 32)
    return tcw.collect_activations(lm, [1], tokens, out=tmp_path_factory.mktemp("dp"), progress=False)


def test_two_processes_match_one_process_on_the_whole_batches(store, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "tc"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(store.root), str(out), repr(CONFIG)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = Transcoder.load(out)
    history = json.loads((out / "history.json").read_text())

    single = Trainer(store, 1, TrainingConfig(**CONFIG), device="cpu", low_precision=False, progress=False)
    alone = single.fit()
    assert single.total_steps == 12
    for name, value in alone.state_dict().items():
        assert torch.allclose(parallel.state_dict()[name], value, rtol=1e-4, atol=1e-5), name
    # the logged metrics are the whole batch's, summed over the processes
    for mine, theirs in zip(single.history, history):
        assert mine.keys() == theirs.keys()
        for key in ("fvu", "loss", "l0", "dead_fraction"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-4, abs=1e-6), key


def test_data_parallel_needs_torchrun_and_an_even_split(store):
    with pytest.raises(ValueError, match="torchrun"):
        Trainer(store, 1, TrainingConfig(**CONFIG), data_parallel=True, progress=False)
    with pytest.raises(ValueError, match="a multiple of n=3"):
        next(store.batches(1, 128, part=(0, 3)))
