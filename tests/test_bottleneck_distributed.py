"""Bottleneck state stays identical across ranks: a real 2-process gloo group, different data per rank.

One spawn runs every scenario (starting processes dominates the cost); the parent compares the ranks' saved
states with each other (exactly) and with a single-process run on the concatenated batches (fp32 tolerance).
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lasers_dist.bottleneck import DictionaryBottleneck, VQBottleneck
from lasers_dist.bottleneck.dictionary import to_signals

WORLD = 2
STEPS = 4
PER_RANK = 2  # images per rank and step


def _global_batch(step):
    """(WORLD * PER_RANK, 4, 4, 4) latents of one step; rank r trains on rows [r * PER_RANK, (r + 1) * PER_RANK)."""
    return torch.randn(WORLD * PER_RANK, 4, 4, 4, generator=torch.Generator().manual_seed(100 + step))


def _bottlenecks():
    """Fresh modules with identical initial state on every process."""
    torch.manual_seed(0)
    return {
        "vq": VQBottleneck(num_codes=16, embed_dim=4, ema_decay=0.9),
        "online": DictionaryBottleneck(24, 4, 2, patch_size=(1, 2), update="online", omp_backend="torch"),
    }


def _revival_bottlenecks():
    torch.manual_seed(1)  # many more atoms than a rank's 32 signals use, so every revival replaces some
    return {
        "vq_revive": VQBottleneck(num_codes=64, embed_dim=4, revive_dead_every=2),
        "online_revive": DictionaryBottleneck(96, 4, 1, update="online", revive_dead_every=2, omp_backend="torch"),
        "gradient_revive": DictionaryBottleneck(96, 4, 1, revive_dead_every=2, omp_backend="torch"),
    }


def _train(modules, batches):
    """Run training forwards; return each module's state and its info.usage per step, (steps, K)."""
    usage = {name: [] for name in modules}
    for z in batches:
        for name, module in modules.items():
            _, _, info = module(z)
            usage[name].append(info.usage)
            if getattr(module, "revival_due", False):
                module.revive_dead()
    return {
        name: ({k: v.clone() for k, v in m.state_dict().items()}, torch.stack(usage[name]))
        for name, m in modules.items()
    }


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        batches = [_global_batch(step)[rows] for step in range(STEPS)]
        result = _train(_bottlenecks(), batches)
        result.update(_train(_revival_bottlenecks(), batches))
        result["signals"] = [to_signals(z, (1, 1)) for z in batches]
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_and_match_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert not torch.equal(ranks[0]["signals"][0], ranks[1]["signals"][0])  # the ranks saw different data

    for name in ("vq", "online", "vq_revive", "online_revive", "gradient_revive"):
        (state0, usage0), (state1, usage1) = ranks[0][name], ranks[1][name]
        for key in state0:
            assert torch.equal(state0[key], state1[key]), f"{name}.{key} differs between ranks"
        assert torch.equal(usage0, usage1), f"{name}: logged usage differs between ranks"
    assert int(ranks[0]["online"][0]["online.t"]) == STEPS

    reference = _train(_bottlenecks(), [_global_batch(step) for step in range(STEPS)])
    for name in ("vq", "online"):
        state, usage = ranks[0][name]
        for key, value in reference[name][0].items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
        assert torch.equal(usage, reference[name][1])
    torch.testing.assert_close(
        ranks[0]["vq"][0]["ema_cluster_size"].sum(), torch.tensor(1.0 * 16 * 0.9**STEPS + 64 * (1 - 0.9**STEPS))
    )

    # Revival installed rank 0's batch vectors on both ranks (normalised for dictionaries). Revivals happen at
    # training forwards 2 and 4; rows revived at step 4 are still exactly as installed.
    normalize = torch.nn.functional.normalize
    last_batch = ranks[0]["signals"][3]
    vq_state, vq_usage = ranks[0]["vq_revive"]
    revived = vq_usage[2:].sum(0) == 0  # unused in the window that ended at step 4
    assert torch.equal(vq_state["ema_cluster_size"][revived], torch.ones(int(revived.sum())))
    _assert_rows_from(vq_state["codebook"][revived], last_batch)
    online_state, online_usage = ranks[0]["online_revive"]
    revived = online_usage[2:].sum(0) == 0
    assert torch.equal(revived, online_state["online.A"].diagonal() == 0)  # their statistics were zeroed
    _assert_rows_from(online_state["dictionary"][revived], normalize(last_batch, dim=1))
    gradient_state = ranks[0]["gradient_revive"][0]
    revived = ~(gradient_state["dictionary"] == _revival_bottlenecks()["gradient_revive"].dictionary).all(dim=1)
    _assert_rows_from(gradient_state["dictionary"][revived], normalize(torch.cat(ranks[0]["signals"][1::2]), dim=1))


def _assert_rows_from(rows, candidates):
    assert rows.shape[0] > 0
    for row in rows:
        assert (candidates - row).abs().amax(dim=1).min() < 1e-6
