"""Parity with titans-pytorch 0.5.5 (run whenever torch and titans-pytorch are importable)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_titans.interop import config_from_titans_pytorch, from_titans_pytorch

torch = pytest.importorskip("torch")
titans_pytorch = pytest.importorskip("titans_pytorch")

KWARGS = [
    dict(dim=32, chunk_size=4),
    dict(dim=32, heads=4, dim_head=8, chunk_size=4, default_step_transform_max_lr=0.1),
    dict(dim=32, heads=2, dim_head=16, chunk_size=8, batch_size=16, qk_rmsnorm=True, default_step_transform_max_lr=0.1),
    dict(dim=32, heads=2, dim_head=16, chunk_size=4, momentum_order=2, per_head_learned_parameters=False),
    dict(
        dim=32,
        chunk_size=4,
        momentum=False,
        post_rmsnorm=True,
        default_model_kwargs=dict(depth=1, expansion_factor=1.0),
    ),
    dict(
        dim=32,
        chunk_size=2,
        mem_model_norm_add_residual=False,
        default_model_kwargs=dict(depth=3, expansion_factor=2.0),
    ),
]


def pair(kwargs):
    torch.manual_seed(0)
    ref = titans_pytorch.NeuralMemory(**kwargs)
    return ref, from_titans_pytorch(ref.state_dict(), **kwargs)


def close(ours, theirs, atol=1e-4):
    theirs = theirs.detach().numpy()
    err = np.abs(np.array(ours) - theirs).max()
    assert err <= atol * max(1.0, np.abs(theirs).max()), err


@pytest.mark.parametrize("kwargs", KWARGS, ids=str)
def test_whole_sequence_matches(kwargs):
    ref, mem = pair(kwargs)
    x = torch.randn(2, 48, 32)
    with torch.no_grad():
        expect, ref_state = ref(x)
    y, state = mem(mx.array(x.numpy()))
    close(y, expect)
    last_weights = ref_state.states[0]
    names = (["gamma"] if mem.config.residual_norm else []) + [f"w{i}" for i in range(mem.config.depth)]
    for i, name in enumerate(names):
        close(state.weights[name], list(last_weights.values())[i])


@pytest.mark.parametrize("kwargs", KWARGS[:3], ids=str)
def test_streams_match(kwargs):
    """The splits titans-pytorch itself gets right: chunk-aligned pieces, and a prompt then single tokens."""
    ref, mem = pair(kwargs)
    x = torch.randn(1, 40, 32)
    xm = mx.array(x.numpy())
    with torch.no_grad():
        expect, _ = ref(x)
        outs, ref_state = [], None
        for a, b in [(0, 16), (16, 32), (32, 40)]:
            y, ref_state = ref(x[:, a:b], state=ref_state)
            outs.append(y)
        aligned = torch.cat(outs, 1)
        outs, ref_state = [], None
        y, ref_state = ref(x[:, :13])
        outs.append(y)
        for t in range(13, 40):
            y, ref_state = ref(x[:, t : t + 1], state=ref_state)
            outs.append(y)
        tokenwise = torch.cat(outs, 1)
    ours, state = [], None
    for a, b in [(0, 16), (16, 32), (32, 40)]:
        y, state = mem(xm[:, a:b], state)
        ours.append(y)
    close(mx.concatenate(ours, 1), aligned)
    ours, state = [], None
    y, state = mem(xm[:, :13])
    ours.append(y)
    for t in range(13, 40):
        y, state = mem(xm[:, t : t + 1], state)
        ours.append(y)
    close(mx.concatenate(ours, 1), tokenwise)
    close(mx.concatenate(ours, 1), expect)


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="max_grad_norm"):
        config_from_titans_pytorch(dim=32, max_grad_norm=2.0)
    with pytest.raises(ValueError, match="unknown"):
        config_from_titans_pytorch(dim=32, chunk_sise=4)
    ref, _ = pair(dict(dim=32, chunk_size=4))
    with pytest.raises(ValueError, match="shape"):
        from_titans_pytorch(
            ref.state_dict(), dim=32, chunk_size=4, default_model_kwargs=dict(depth=2, expansion_factor=2.0)
        )


def test_converter_cli_round_trip(tmp_path, capsys):
    from mlx_titans.interop import main

    from mlx_titans import NeuralMemory

    kwargs = dict(dim=32, heads=2, dim_head=16, chunk_size=4)
    ref, _ = pair(kwargs)
    torch.save(ref.state_dict(), tmp_path / "mem.pt")
    out = tmp_path / "mem-mlx"
    import json

    assert main(["--checkpoint", str(tmp_path / "mem.pt"), "--kwargs", json.dumps(kwargs), "--out", str(out)]) == 0
    mem = NeuralMemory.from_pretrained(out)
    x = torch.randn(1, 21, 32)
    with torch.no_grad():
        expect, _ = ref(x)
    close(mem(mx.array(x.numpy()))[0], expect)
    # a bad option: one line, non-zero, nothing written
    bad = tmp_path / "bad-out"
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path / "mem.pt"),
                "--kwargs",
                json.dumps({**kwargs, "max_grad_norm": 1.0}),
                "--out",
                str(bad),
            ]
        )
        != 0
    )
    assert not bad.exists()
    assert "max_grad_norm" in capsys.readouterr().err
