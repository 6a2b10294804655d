"""model.norm / model.positions / model.ffn: the native model with GPT-2's parts, against a plain GPT-2 written
here (LayerNorm without bias, learned positions, 4×GELU MLP, tied head); defaults unchanged; bad values."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, compose

from ease.app.runner import run
from ease.checkpoint import load_checkpoint, model_from_args
from ease.inference.generation import make_decoder
from ease.model import EarlyExitTransformer
from ease.model.attention import KVCache
from ease.model.config import ModelConfig

GPT2 = {"norm": "layer", "positions": "learned", "ffn": "gelu", "tie_weights": True, "max_positions": 24}


def gpt2_model(layers: int = 3) -> EarlyExitTransformer:
    torch.manual_seed(0)
    return EarlyExitTransformer(50, 16, layers, num_heads=2, **GPT2)


def plain_gpt2(m: EarlyExitTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's logits, GPT-2 written out from the model's weights (nanoGPT's forward, no early exit)."""
    B, T = x.shape
    C, nh = m.dim, m.num_heads
    ln = lambda h, w: F.layer_norm(h, (C,), w, None, 1e-5)  # noqa: E731
    h = m.embedding.weight[x] + m.pos_embedding.weight[:T]
    out = []
    for b in m.layers:
        q, k, v = (F.linear(ln(h, b.attn_norm.weight), b.attn.qkv.weight)).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (C // nh) ** 0.5
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        h = h + F.linear((att @ v).transpose(1, 2).reshape(B, T, C), b.attn.proj.weight)
        u = ln(h, b.ffn_norm.weight)
        h = h + F.linear(F.gelu(F.linear(u, b.ffn.w1.weight)), b.ffn.w2.weight)
        out.append(F.linear(ln(h, m.norm.weight), m.embedding.weight))  # the tied head at every exit
    return out


def test_gpt2_parts_match_a_plain_gpt2_at_every_exit_and_in_the_gradient() -> None:
    m = gpt2_model()
    with torch.no_grad():  # non-trivial norm weights
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    x = torch.randint(0, 50, (2, 12))
    got = m(x, [1, 2, 3])
    want = plain_gpt2(m, x)
    for layer in (1, 2, 3):
        torch.testing.assert_close(got[layer], want[layer - 1], rtol=1e-5, atol=1e-5)
    assert m.output_head.weight is m.embedding.weight
    names = {n for n, _ in m.named_parameters()}
    assert "pos_embedding.weight" in names and "layers.0.ffn.w1.weight" in names and "rope" not in str(names)
    assert m.layers[0].ffn.w1.weight.shape == (64, 16)  # hidden 4·dim
    assert sum(p.numel() for p in m.parameters()) == 50 * 16 + 24 * 16 + 3 * (2 * 16 + 4 * 16 * 16 + 8 * 16 * 16) + 16
    F.cross_entropy(got[3].reshape(-1, 50), x.reshape(-1)).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    F.cross_entropy(plain_gpt2(m, x)[2].reshape(-1, 50), x.reshape(-1)).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_learned_positions_with_a_cache_and_with_active_tokens() -> None:
    """Token by token through the cache (embed at pos) gives the full forward's logits; forward_active with every
    token active gives the plain block; a table too short for the sequence is one clear error."""
    m = gpt2_model().eval()
    x = torch.randint(0, 50, (2, 10))
    full = m(x)
    cache = [KVCache() for _ in range(3)]
    with torch.no_grad():
        for t in range(10):
            h = m.embed(x[:, t : t + 1], t)
            for i in (1, 2, 3):
                h = m.layer(i, h, t, cache)
            torch.testing.assert_close(m.unembed(h)[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
        h = m.embed(x)
        active = torch.ones(2, 10, dtype=torch.bool)
        torch.testing.assert_close(m.layer(1, h, active=active), m.layer(1, h), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"^model.max_positions: learned positions end at 24, got 25$"):
        m.embed(torch.zeros(1, 25, dtype=torch.long))
    assert m.max_positions == 24  # the protocol's position limit: generation keeps a prompt's last tokens within it
    # generation: the reference decoder (the fused one is written for RMSNorm/RoPE/SwiGLU and refuses)
    assert type(make_decoder(m, 1, 16)).__name__ == "EarlyExitDecoder"
    with pytest.raises(ValueError, match=r"^decoder: fused decodes"):
        make_decoder(m, 1, 16, decoder="fused")


def test_each_option_alone_and_the_checkpoint_round_trip() -> None:
    x = torch.randint(0, 50, (2, 8))
    for arch in ({"norm": "layer"}, {"positions": "learned"}, {"ffn": "gelu"}, GPT2):
        torch.manual_seed(0)
        m = EarlyExitTransformer(50, 16, 2, num_heads=2, **arch)
        assert not m.llama_style
        again = model_from_args(m.config_dict())
        again.load_state_dict(m.state_dict())
        torch.testing.assert_close(again(x, [1, 2])[1], m(x, [1, 2])[1], rtol=0, atol=0)
        deeper = m.extended(3)  # ASHEM's growth keeps the architecture and the copied weights
        assert deeper.config_dict() == {**m.config_dict(), "num_layers": 3}
        torch.testing.assert_close(deeper(x, [2]), m(x, [2]), rtol=0, atol=0)


def test_defaults_build_the_same_model_and_old_checkpoints_load() -> None:
    """The defaults draw the same weights as the model before these keys, under the same names; a checkpoint's
    model_args from before (without the keys) rebuild it."""
    torch.manual_seed(0)
    m = EarlyExitTransformer(50, 16, 2, num_heads=2)
    old_args = {k: v for k, v in m.config_dict().items() if k not in ("norm", "positions", "ffn", "max_positions")}
    torch.manual_seed(0)
    again = model_from_args(old_args)
    assert m.llama_style and again.llama_style and again.pos_embedding is None and m.max_positions is None
    assert list(m.state_dict()) == list(again.state_dict())
    assert "layers.0.ffn.w13.weight" in m.state_dict() and "layers.0.attn_norm.weight" in m.state_dict()
    for (n, p), q in zip(m.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("norm", "batch", "model.norm: must be one of rms, layer, got 'batch'"),
        ("positions", "alibi", "model.positions: must be one of rotary, learned, got 'alibi'"),
        ("ffn", "relu", "model.ffn: must be one of swiglu, gelu, got 'relu'"),
        ("max_positions", 0, "model.max_positions: must be an int >= 1, got 0"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        ModelConfig(**{key: value})


def test_hf_backbones_refuse_the_native_options() -> None:
    with pytest.raises(ValueError, match=r"^model\.norm: only for model\.backbone=native"):
        ModelConfig(backbone="hf", hf_config={"model_type": "llama"}, norm="layer")
    ModelConfig(backbone="hf", hf_config={"model_type": "llama"})  # defaults are fine


def test_train_py_trains_and_evaluates_the_gpt2_architecture(tmp_path: Path) -> None:
    overrides = ["+preset=deed", *FAST, "model.norm=layer", "model.positions=learned", "model.ffn=gelu"]
    record = run(compose([*overrides, "model.tie_weights=true"]), tmp_path)
    assert record["status"] == "ok" and 1.0 < record["metrics"]["ppl"] < 1e4
    model, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (model.norm_kind, model.positions, model.ffn_kind, model.tie_weights) == ("layer", "learned", "gelu", True)
