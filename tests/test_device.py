"""Host/device hygiene: the demo, the CLI commands, sweeps, the search tools and the
Runner's public calls with the runner on a CUDA device simulated on CPU
(``tests/fake_cuda.py``): a device tensor handed to numpy or mixed with a host
tensor raises there, as it would on a GPU (or worse, silently syncs per element).

The simulated device holds the runner's weights and everything computed from them;
the TransformerLens model stays on the host (the fake cannot move its modules), so
these runs also cover a runner on a GPU with the model it was built from on the CPU.
Results are moved to the host inside ``fake_cuda()`` (outside it a simulated device
tensor cannot be told from a real one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastskip as fs
from fake_cuda import FakeCuda, HostDeviceError, fake_cuda
from fastskip.cli import commands, main
from helpers import ANSWERS, PROMPTS, small_model


def device_runner(model, **kwargs) -> fs.Runner:
    return fs.Runner(model, device="cuda", compile=False, kernels=False, verbose=False,
                     **kwargs)


@pytest.fixture(scope="module")
def model():
    torch.set_grad_enabled(False)
    return small_model(seed=2)


@pytest.fixture
def on_device(model, monkeypatch):
    """The CLI's ``--model tiny`` on the simulated device."""
    monkeypatch.setattr(commands, "load_runner", lambda args: device_runner(model))
    with fake_cuda():
        yield


def test_the_simulated_device_refuses_what_a_gpu_refuses():
    with fake_cuda():
        x = torch.arange(6.0).to("cuda")
        assert isinstance(x, FakeCuda) and x.device.type == "cuda" and (x * 2).is_cuda
        with pytest.raises(HostDeviceError, match="numpy"):
            x.numpy()
        with pytest.raises(HostDeviceError, match="__array__"):
            np.asarray(x)
        with pytest.raises(HostDeviceError, match="a CUDA tensor and a CPU tensor"):
            x + torch.ones(6)
        assert float(x.sum()) == 15.0  # scalar reads work, as on CUDA
        assert x.cpu().numpy().tolist() == [0, 1, 2, 3, 4, 5]
        assert x[torch.tensor([1, 2])].is_cuda  # CPU indices are fine, as on CUDA
        assert torch.zeros(2, device="cuda").is_cuda and not torch.zeros(2).is_cuda


def test_runner_calls_stay_on_the_device_and_match_the_host(model):
    plans = fs.grid.random_plans(12, 3, 4, seed=0)
    host = fs.Runner(model, verbose=False)
    want = host.run(plans, PROMPTS[:3], ANSWERS[:3], wrong_answers=[" 6", " June", " six"],
                    kl=True)
    tokens = model.to_tokens(PROMPTS[:3])
    with fake_cuda():
        runner = device_runner(model, verify=2)
        res = runner.run(plans, PROMPTS[:3], ANSWERS[:3], wrong_answers=[" 6", " June", " six"],
                         kl=True)
        assert res.rank.is_cuda and res.logit_diff.is_cuda
        cpu = res.cpu()
        assert not cpu.rank.is_cuda and cpu.rank.numpy().shape == want.rank.shape
        df = res.to_pandas()
        logits = runner.logits(plans, tokens, last_only=True).cpu()
        diff = runner.logit_diff(plans, PROMPTS[:3], ANSWERS[:3], [" 6", " June", " six"]).cpu()
        assert fs.check(runner, plans.take(np.arange(4)), tokens) <= 1e-4
        mean = runner.run(plans, PROMPTS[:3], ANSWERS[:3],
                          ablation=fs.Ablation.mean(tokens=tokens))
        assert mean.rank.is_cuda
        bf16 = device_runner(model, dtype=torch.bfloat16).run(plans, PROMPTS[:3], ANSWERS[:3])
        assert bf16.rank.is_cuda
        masked = device_runner(model, strategy="masked").run(plans, PROMPTS[:3],
                                                              ANSWERS[:3]).cpu()
    torch.testing.assert_close(cpu.logit, want.logit, atol=1e-5, rtol=0)
    assert len(df) == len(want.to_pandas())
    torch.testing.assert_close(logits, host.logits(plans, tokens, last_only=True),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(diff, want.logit_diff.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(masked.logit, want.logit, atol=1e-4, rtol=0)


def test_demo_on_the_device_prints_the_notebook_experiment(capsys):
    """The 12-layer branch (the notebook's plans and prompts) with a small 12-layer model."""
    deep = small_model(seed=3, n_layers=12)
    with fake_cuda():
        from fastskip.cli.demo import demo

        demo(device_runner(deep), "tiny-12")
    out = capsys.readouterr().out
    assert "0-7,9.mlp" in out and "Checked against TransformerLens" in out
    assert "on cuda" in out


def test_demo_on_the_device_any_depth(model, capsys):
    """The other branch: cut-offs, leave-one-out and the greedy block removal."""
    with fake_cuda():
        from fastskip.cli.demo import demo

        demo(device_runner(model), "tiny")
    out = capsys.readouterr().out
    assert "Greedy block removal" in out and "on cuda" in out


def test_cli_commands_on_the_device(on_device, tmp_path, capsys):
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("\n".join(f"{p}\t{a}\t zebra" for p, a in zip(PROMPTS, ANSWERS,
                                                                     strict=True)))
    out = tmp_path / "heads.parquet"
    for argv in (["run", "--plan", "all", "--plan", "0,2.mlp", "--prompt", "1 2 3",
                  "--answer", " 4"],
                 ["sweep", "--grid", "heads", "--prompts", str(prompts), "--out", str(out),
                  "--csv"],
                 ["show", str(out), "--top", "3"],
                 ["search", "prune-nodes", "--prompts", str(prompts), "--threshold", "0.5"],
                 ["search", "prune-layers", "--prompts", str(prompts), "--threshold", "0.5"],
                 ["check", "--n-random", "3"],
                 ["bench", "--quick"]):
        rc = main([*argv, "--device", "cuda", "--quiet"] if argv[0] != "show" else argv)
        captured = capsys.readouterr()
        assert rc == 0, f"{argv}: {captured.err}"
        assert captured.out, argv
    assert len(fs.io.load_results(out).plans) == 13


def test_search_tools_on_the_device(model):
    from fastskip.search import exhaustive, interactions, prune_layers, prune_nodes, tasks

    task = tasks.make_task("numerals", n=4, seed=0)
    with fake_cuda():
        runner = device_runner(model)
        nodes = prune_nodes(runner, task, threshold=0.5)
        layers = prune_layers(runner, task, threshold=0.5)
        ex = exhaustive(runner, task)
        table = interactions(runner, ["2.mlp", "1.attn", "1.0"], task)
        frames = [nodes.to_pandas(), ex.pareto, table.to_pandas()]
        mean = prune_nodes(runner, task, threshold=0.5, ablation="mean")
    assert nodes.plan and layers.plan and mean.plan and all(len(f) for f in frames)


def test_sweep_on_the_device(model, tmp_path):
    from fastskip.output.sweep import sweep

    plans = fs.grid.block_subsets(3)
    with fake_cuda():
        df = sweep(device_runner(model), plans, PROMPTS[:3], ANSWERS[:3],
                   out=tmp_path / "blocks.parquet", chunk_size=3)
    assert len(df) == len(plans) * 3
