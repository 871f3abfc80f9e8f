"""Wan 2.2's experts under FSDP2, the part that needs no second process: :meth:`WanModel.set_shard_sync` makes every
velocity call run each sharded expert that *any* process routes rows to (an idle one-token pass where this process
has none), joined to the velocity with an exact zero gradient. Here the "other processes" are a stand-in for the
all-reduce that says which experts they need. Checked: the velocity and the gradients are bitwise those of the
unsharded path, the idle expert's weights get gradients that are exactly zero (the backward reached them, as FSDP's
reduce-scatter needs), the experts run in the same order on every kind of batch, and the backward reaches the
low-noise expert before the high-noise one whatever the routing. The 2-process runs against one process are in
tests/test_distributed.py (slow)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from diffrl.models import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")

FRAMES = 5
SIZE = (32, 48)


def _model(expert: str):
    model = load_model("tiny:wan22", num_frames=FRAMES, expert=expert)
    model.add_lora(rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with (
        torch.no_grad()
    ):  # random B matrices: the LoRA changes the velocity, so its gradients are not trivial
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _inputs(model, levels: list[float]):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((len(levels), *model.latent_shape(*SIZE)), generator=g)
    cond = model.encode(["a red cat", "a blue dog", "a cat", "a dog"][: len(levels)], negative_prompt="")
    return x, torch.tensor(levels), cond


def _trace(model):
    """Records each expert's forwards (name, batch) and the order the backward reaches their outputs."""
    calls, grads = [], []
    names = {id(model.high_noise_expert): "high", id(model.transformer_2): "low"}

    def hook(module, args, kwargs, output):
        name = names[id(module)]
        calls.append((name, kwargs["hidden_states"].shape[0]))
        out = output[0] if isinstance(output, tuple) else output.sample
        if out.requires_grad:
            out.register_hook(lambda g, name=name: grads.append(name))

    handles = [
        m.register_forward_hook(hook, with_kwargs=True)
        for m in (model.high_noise_expert, model.transformer_2)
    ]
    return calls, grads, handles


def _velocity_and_grads(model, x, t, cond):
    params = [(n, p) for n, p in model.pipe.transformer.named_parameters() if p.requires_grad]
    params += [(f"2.{n}", p) for n, p in model.pipe.transformer_2.named_parameters() if p.requires_grad]
    for _, p in params:
        p.grad = None
    v = model.velocity(x, t, cond, guidance_scale=5.0)
    w = torch.linspace(-1, 1, v.numel()).view_as(v)
    if v.requires_grad:
        (v.float() * w).sum().backward()
    return v.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in params}


# levels (of sigma): 0.95 and 0.9 route to the high-noise expert (tiny:wan22's boundary is 0.875), 0.5 and 0.3 low
BATCHES = {"high only": [0.95, 0.9], "low only": [0.5, 0.3], "mixed": [0.95, 0.5, 0.9, 0.3]}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("expert", ["both", "low"])
def test_lockstep_velocity_and_gradients_equal_the_unsharded_ones(expert, batch):
    model = _model(expert)
    x, t, cond = _inputs(model, BATCHES[batch])
    v0, g0 = _velocity_and_grads(model, x, t, cond)
    calls0, _, handles = _trace(model)
    _velocity_and_grads(model, x, t, cond)
    for h in handles:
        h.remove()

    asked = []

    def every_expert_wanted(flags):  # another process routes rows to both experts
        asked.append(flags.tolist())
        return torch.ones_like(flags)

    model.set_shard_sync(every_expert_wanted)
    calls, order, handles = _trace(model)
    v1, g1 = _velocity_and_grads(model, x, t, cond)
    for h in handles:
        h.remove()
    local = [any(s >= 0.875 for s in BATCHES[batch]), any(s < 0.875 for s in BATCHES[batch])]
    assert asked == [local]  # one question a velocity call: the experts this process routes rows to
    assert torch.equal(v0, v1)  # the idle pass changes nothing in the velocity, bit for bit
    trained = {"both": {"high", "low"}, "low": {"low"}}[expert]
    # both experts (both sharded, the frozen one too) run on every batch, in the same order (high, then low); an
    # idle pass is one sample (CFG doubles the real ones)
    rows = {
        "high": 2 * sum(s >= 0.875 for s in BATCHES[batch]),
        "low": 2 * sum(s < 0.875 for s in BATCHES[batch]),
    }
    assert calls == [(e, rows[e] or 1) for e in ("high", "low")], (calls, calls0)
    # the backward reaches the low-noise expert first, whatever the routing (a fixed order of reduce-scatters); a
    # frozen expert's pass has no graph to reach
    assert order == [e for e in ("low", "high") if e in trained]
    for name, grad in g1.items():
        expert_of = "low" if name.startswith("2.") else "high"
        assert expert_of in trained  # only trained weights have gradients
        if g0[name] is not None:
            assert torch.equal(grad, g0[name]), name  # the real rows' gradients, bit for bit
        else:  # an idle expert: reached by the backward, with an exact zero gradient
            assert grad is not None and not grad.any(), name
    if any(rows[e] for e in trained):  # not vacuous: the trained rows give real gradients
        assert any(g is not None and g.abs().max() > 0 for g in g1.values())
    else:  # expert=low on high-noise rows only: the loss has a graph through the idle pass alone, all zeros
        assert all(g is None or not g.any() for g in g1.values())


def test_no_idle_pass_where_no_process_needs_the_expert():
    """The all-reduce says no other process routes rows to the idle expert: it is not run (no all-gather spent), and a
    batch of the frozen expert's levels gives a velocity without a graph, as without FSDP."""
    model = _model("low")
    model.set_shard_sync(lambda flags: flags.clone())  # the other processes route as this one does
    x, t, cond = _inputs(model, BATCHES["high only"])
    calls, _, handles = _trace(model)
    v = model.velocity(x, t, cond, guidance_scale=5.0)
    for h in handles:
        h.remove()
    assert calls == [("high", 4)] and not v.requires_grad


def test_idle_pass_under_no_grad_runs_without_a_graph():
    """Sampling and the reference / old-policy passes run without gradients: the idle expert still runs (its
    all-gathers), and the velocity is that of the unsharded path."""
    model = _model("both")
    x, t, cond = _inputs(model, BATCHES["low only"])
    with torch.no_grad():
        v0 = model.velocity(x, t, cond, guidance_scale=5.0)
        model.set_shard_sync(torch.ones_like)
        calls, _, handles = _trace(model)
        v1 = model.velocity(x, t, cond, guidance_scale=5.0)
    for h in handles:
        h.remove()
    assert calls == [("high", 1), ("low", 4)] and torch.equal(v0, v1)


def test_sharded_modules_of_each_training_mode():
    """FSDP2 shards both experts' blocks and each expert as its own root, the frozen one too."""
    both, low = load_model("tiny:wan22", expert="both"), load_model("tiny:wan22", expert="low")
    assert both.shard_roots() == [both.pipe.transformer, both.pipe.transformer_2]
    assert both.shard_blocks() == [*both.pipe.transformer.blocks, *both.pipe.transformer_2.blocks]
    assert low.shard_roots() == [low.pipe.transformer, low.pipe.transformer_2]  # the frozen expert too
    assert low.shard_blocks() == [*low.pipe.transformer.blocks, *low.pipe.transformer_2.blocks]
    wan = load_model("tiny:wan")
    wan.set_shard_sync(
        lambda flags: 1 / 0
    )  # one transformer: nothing to keep in step, the hook is never called
    x, t, cond = _inputs(wan, [0.9, 0.3])
    with torch.no_grad():
        wan.velocity(x, t, cond, guidance_scale=5.0)


def test_idle_pass_mirrors_a_latent_with_a_graph():
    """ReFL backpropagates through its chain, so the latent has a graph: the idle pass's input then has one too, and
    the backward reaches even the frozen expert's idle pass (as it reaches a frozen expert's real one, whose
    backward FSDP2 runs with all-gathers); the latent's gradient is that of the unsharded path, bit for bit."""
    model = _model("low")
    x, t, cond = _inputs(model, BATCHES["low only"])

    def latent_grad():
        xg = x.clone().requires_grad_()
        v = model.velocity(xg, t, cond, guidance_scale=5.0)
        (v.float() * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
        return xg.grad

    g0 = latent_grad()
    model.set_shard_sync(torch.ones_like)
    calls, order, handles = _trace(model)
    g1 = latent_grad()
    for h in handles:
        h.remove()
    assert calls == [("high", 1), ("low", 4)] and order == ["low", "high"]
    assert torch.equal(g0, g1)


def test_image_to_video_experts_keep_in_step():
    """Wan 2.2 I2V A14B's layout (tiny:wan22_i2v: the condition latent concatenated to the noisy one, 36 input
    channels): the idle pass takes the expert's own input width, and the velocity of a low-noise batch is unchanged."""
    import numpy as np
    from PIL import Image

    model = load_model("tiny:wan22_i2v", num_frames=FRAMES, expert="low")
    model.add_lora(rank=4, alpha=8)
    x = torch.randn((2, *model.latent_shape(*SIZE)), generator=torch.Generator().manual_seed(0))
    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 60, 3), dtype=np.uint8))
        for i in (5, 6)
    ]
    cond = model.encode(["a red cat walks", "a blue square"], images=images)
    t = torch.tensor([0.5, 0.3])
    with torch.no_grad():
        v0 = model.velocity(x, t, cond, 5.0)
        model.set_shard_sync(torch.ones_like)
        calls, _, handles = _trace(model)
        v1 = model.velocity(x, t, cond, 5.0)
    for h in handles:
        h.remove()
    assert calls == [("high", 1), ("low", 4)] and torch.equal(v0, v1)
