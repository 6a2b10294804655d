"""Hugging Face causal LMs as backbones: each exit against the model's own forward, training, ASHEM, decoding,
saving. Every model is built from a config and saved/loaded locally (tests/hf_models.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import between, random_batches
from hf_models import ARCHITECTURES, save_tiny, tiny

transformers = pytest.importorskip("transformers")

from ease import hf  # noqa: E402
from ease.config import TrainingConfig  # noqa: E402
from ease.hf import architectures  # noqa: E402
from ease.inference.decoder import EarlyExitDecoder  # noqa: E402
from ease.losses import weighted_exit_loss  # noqa: E402
from ease.model.backbone import Backbone, exit_logits  # noqa: E402
from ease.routing import max_prob  # noqa: E402
from ease.training import Trainer  # noqa: E402

TEXT = "The cat sat on the mat .\nA dog ran after the cat , and the mat was left behind .\n" * 20


def hf_layer_logits(model: hf.HFBackbone, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's logits from the HF model's own forward: lm_head(norm(hidden_states[l])), the last one as
    the model returns it (transformers hands back hidden_states[L] already normed)."""
    head = model.hf.get_output_embeddings()
    final_norm = model.hf.transformer.ln_f if model.model_type == "gpt2" else model.hf.model.norm
    with torch.no_grad():
        out = model.hf(x, output_hidden_states=True)
        logits = {layer: head(final_norm(out.hidden_states[layer])) for layer in range(1, model.num_layers)}
    logits[model.num_layers] = out.logits
    return logits


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_exit_equals_the_hf_forward(model_type: str) -> None:
    model = tiny(model_type)
    assert isinstance(model, Backbone)
    x = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    ref = hf_layer_logits(model, x)
    with torch.no_grad():
        ours = exit_logits(model, x, [1, 2, 3])
        last = model(x)
    assert (last - ref[3]).abs().max().item() <= 1e-5
    for layer in (1, 2, 3):
        assert (ours[layer] - ref[layer]).abs().max().item() <= 1e-5, layer


def test_exits_run_only_the_layers_they_need() -> None:
    model = tiny("llama")
    calls = []
    for i, block in enumerate(model.layers, start=1):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        exit_logits(model, torch.zeros(1, 4, dtype=torch.long), [2])
    assert calls == [1, 2]


def test_weighted_loss_equals_a_per_layer_loop() -> None:
    model = tiny("qwen2")
    x, y = random_batches(97, n=1, batch=2, seq=10)[0]
    weights = {1: 0.2, 2: 0.0, 3: 0.8}
    with torch.no_grad():
        loss, per_layer = weighted_exit_loss(model, x, y, weights)
    ref = hf_layer_logits(model, x)
    expected = sum(w * F.cross_entropy(ref[layer].reshape(-1, 97), y.reshape(-1)) for layer, w in weights.items())
    assert math.isclose(loss.item(), float(expected), rel_tol=1e-5)
    assert sorted(per_layer) == [1, 3]


def test_lr_scales_reach_one_param_group_per_decoder_layer() -> None:
    model = tiny("llama", layers=4)
    config = TrainingConfig(
        layer_weights={4: 1.0}, layer_lr_scales={1: 0.25, 2: 0.5, 3: 1.0, 4: 2.0}, head_lr_scale=3.0
    )
    opt = Trainer(config, model.vocab_size).create_optimizer(model, base_lr=0.01)
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["embedding", "layer_1", "layer_2", "layer_3", "layer_4", "head"]
    for i, scale in enumerate([0.25, 0.5, 1.0, 2.0], start=1):
        assert groups[f"layer_{i}"]["lr"] == pytest.approx(0.01 * scale)
        assert {id(p) for p in groups[f"layer_{i}"]["params"]} == {
            id(p) for p in model.hf.model.layers[i - 1].parameters()
        }
    assert groups["embedding"]["lr"] == pytest.approx(0.0025)  # layer 1's scale, as it feeds layer 1
    assert groups["head"]["lr"] == pytest.approx(0.03)
    assert {id(p) for p in groups["head"]["params"]} == {
        id(p) for p in [*model.hf.model.norm.parameters(), *model.hf.lm_head.parameters()]
    }
    every = [p for g in opt.param_groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))


def test_tied_gpt2_head_is_trained_once_in_the_embedding_group() -> None:
    model = tiny("gpt2")
    assert model.hf.lm_head.weight is model.hf.transformer.wte.weight
    opt = Trainer(TrainingConfig(layer_weights={3: 1.0}), model.vocab_size).create_optimizer(model)
    every = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(every) == len(set(every))
    embedding = next(g for g in opt.param_groups if g["name"] == "embedding")
    assert any(p is model.hf.lm_head.weight for p in embedding["params"])


def test_training_steps_move_the_loss_down() -> None:
    model = tiny("llama")
    trainer = Trainer(TrainingConfig(layer_weights={1: 0.5, 3: 0.5}), model.vocab_size)
    opt = trainer.create_optimizer(model, base_lr=3e-3)
    batches = random_batches(97, n=2, batch=4, seq=12)
    before = trainer.evaluate(model, batches)["loss"]
    for epoch in range(3):
        trainer.train_epoch(model, batches, opt, epoch)
    assert trainer.evaluate(model, batches)["loss"] < before


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_threshold_zero_generation_equals_hf_greedy_generate(model_type: str) -> None:
    model = tiny(model_type)
    prompt = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    dec = EarlyExitDecoder(model, 1, 64, exit_layer=1, routing_threshold=0.0)
    token = dec.prefill(prompt, return_layers=True)[model.num_layers][:, -1].argmax(-1)
    tokens = [int(token)]
    for _ in range(11):
        token = dec.step(token).logits.argmax(-1)
        tokens.append(int(token))
    assert tokens == expected[0, 6:].tolist()


def routed_by_token(model: hf.HFBackbone, seqs: torch.Tensor, exits: list[int], thresholds: list[float]):
    """Plain reference: a full forward, then each token scored at its first exit whose confidence passes."""
    ref = hf_layer_logits(model, seqs)
    out = ref[model.num_layers].clone()
    exit_at = torch.full(seqs.shape, model.num_layers)
    done = torch.zeros(seqs.shape, dtype=torch.bool)
    for e, t in zip(exits, thresholds):
        stop = ~done & (max_prob(ref[e]) >= t)
        out[stop], exit_at[stop] = ref[e][stop], e
        done |= stop
    return out, exit_at


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_recompute_decoding_equals_a_full_forward_routed_token_by_token(model_type: str) -> None:
    model = tiny(model_type, layers=4)
    with torch.no_grad():
        model.hf.get_output_embeddings().weight.mul_(8.0)  # peaky: confidences spread over (0, 1)
    seqs = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    ref = hf_layer_logits(model, seqs)
    exits = [1, 2]
    thresholds = [between(max_prob(ref[e]), 0.5, gap=1e-5) for e in exits]
    expected, exit_at = routed_by_token(model, seqs, exits, thresholds)
    for row in range(2):  # one row at a time: each row's positions stay its own
        dec = EarlyExitDecoder(model, 1, 16, exits, thresholds, kv_mode="recompute")
        dec.prefill(seqs[row : row + 1, :4])
        for t in range(4, 16):
            out = dec.step(seqs[row : row + 1, t])
            assert int(out.exit_layer) == int(exit_at[row, t])
            assert (out.logits[0] - expected[row, t]).abs().max().item() <= 1e-4
    assert len(set(exit_at[:, 4:].flatten().tolist())) > 1  # some tokens did exit early


def test_propagate_mode_runs_rows_independently() -> None:
    model = tiny("qwen2", layers=4)
    with torch.no_grad():
        model.hf.get_output_embeddings().weight.mul_(8.0)
    seqs = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(4))
    thresholds = [between(max_prob(hf_layer_logits(model, seqs)[2]), 0.5, gap=1e-5)]

    def decode(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dec = EarlyExitDecoder(model, batch.shape[0], 12, [2], thresholds, kv_mode="propagate")
        dec.prefill(batch[:, :3])
        outs = [dec.step(batch[:, t]) for t in range(3, 12)]
        return torch.stack([o.logits for o in outs], 1), torch.stack([o.exit_layer for o in outs], 1)

    logits, exits = decode(seqs)
    for row in range(3):
        alone, alone_exits = decode(seqs[row : row + 1])
        assert torch.equal(exits[row], alone_exits[0])
        assert (logits[row] - alone[0]).abs().max().item() <= 1e-4
    assert (exits == 2).any() and (exits == 4).any()


def test_saved_folder_reloads_with_plain_transformers_and_restores_routing(tmp_path) -> None:
    folder = save_tiny(tmp_path / "m", "llama", TEXT, layers=4, exit_layer=2, routing_threshold=0.6)
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    saved = hf.from_pretrained(str(folder))
    assert saved.exit_layers == (2,) and saved.routing_thresholds == (0.6,)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert torch.equal(plain(x).logits, saved.eval()(x))
    override = hf.from_pretrained(str(folder), exit_layer=[1, 3], routing_threshold=[0.9, 0.8])
    assert override.exit_layers == (1, 3) and override.routing_thresholds == (0.9, 0.8)


def test_depth_can_be_cut_or_grown_at_load(tmp_path) -> None:
    folder = save_tiny(tmp_path / "m", "qwen2", TEXT, layers=4)
    full = hf.from_pretrained(str(folder)).eval()
    x = torch.randint(0, 50, (1, 7))
    cut = hf.from_pretrained(str(folder), num_layers=2).eval()
    assert cut.num_layers == 2 and len(cut.layers) == 2
    with torch.no_grad():
        assert torch.equal(cut(x), exit_logits(full, x, [2])[2])
    grown = hf.from_pretrained(str(folder), num_layers=6).eval()
    assert grown.num_layers == 6 and len(grown.config_dict()["hf_config"]["layer_types"]) == 6
    for a, b in zip(full.layers.parameters(), list(grown.layers.parameters())[: len(list(full.layers.parameters()))]):
        assert torch.equal(a, b)


def test_extended_copies_every_weight_and_adds_fresh_layers() -> None:
    model = tiny("mistral", layers=2)
    deeper = model.extended(4)
    assert deeper.num_layers == 4
    old = model.hf.state_dict()
    new = deeper.hf.state_dict()
    for key, value in old.items():
        assert torch.equal(new[key], value), key
    assert any(".3." in key for key in new) and not any(".3." in key for key in old)


def test_checkpoint_args_rebuild_the_architecture() -> None:
    from ease.checkpoint import model_from_args

    model = tiny("gpt2", exit_layer=2, routing_threshold=0.4)
    args = model.config_dict()
    rebuilt = model_from_args(args)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))
    assert rebuilt.exit_layers == (2,) and rebuilt.routing_thresholds == (0.4,)


def test_unsupported_architecture_is_one_line_naming_it() -> None:
    config = transformers.AutoConfig.for_model(
        "gemma", vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, head_dim=8,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"^model.name_or_path: architecture 'gemma' is not supported") as err:
        hf.wrap(model)
    assert "\n" not in str(err.value)


def test_missing_folder_is_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^model.name_or_path: no config.json in"):
        hf.from_pretrained(str(tmp_path / "nothing"))


def test_missing_extra_names_the_install_command(monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.split(".")[0] == "transformers":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    monkeypatch.setattr("importlib.import_module", lambda name: no_transformers(name))
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        hf.from_config("llama", vocab_size=8)


def sliding(model_type: str) -> hf.HFBackbone:
    """Sliding-window attention over 4 positions: Mistral on every layer, Qwen2 on layers 2-4 (hybrid)."""
    from hf_models import config_kwargs

    kw = config_kwargs(model_type, layers=4)
    kw.update(sliding_window=4)
    if model_type == "qwen2":
        kw.update(use_sliding_window=True, max_window_layers=1)
    torch.manual_seed(0)
    model = hf.from_config(model_type, **kw).eval()
    with torch.no_grad():
        model.hf.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_sliding_window_layers_decode_like_the_full_forward(model_type: str) -> None:
    model = sliding(model_type)
    assert any(architectures.is_sliding(model.hf.config, i) for i in range(4))
    seqs = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(6))
    ref = hf_layer_logits(model, seqs)
    exits = [1, 2]
    thresholds = [between(max_prob(ref[e]), 0.5, gap=1e-5) for e in exits]
    expected, exit_at = routed_by_token(model, seqs, exits, thresholds)
    dec = EarlyExitDecoder(model, 1, 14, exits, thresholds, kv_mode="recompute")
    dec.prefill(seqs[:, :3])
    for t in range(3, 14):  # past the window: the cache keeps only its last positions
        out = dec.step(seqs[:, t])
        assert int(out.exit_layer) == int(exit_at[0, t])
        assert (out.logits[0] - expected[0, t]).abs().max().item() <= 1e-4


class FullCompute(hf.HFBackbone):
    """The protocol's plain fallback for skipped tokens: run the whole layer, keep the inactive tokens' input."""

    def layer(self, i, h, pos=0, cache=None, active=None):
        out = super().layer(i, h, pos, cache)
        return out if active is None else torch.where(active[..., None], out, h)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_kv_only_skipped_layers_equal_the_full_layer_fallback(model_type: str) -> None:
    model = tiny(model_type, layers=4)
    with torch.no_grad():
        model.hf.get_output_embeddings().weight.mul_(8.0)
    fallback = FullCompute(model.hf)
    seqs = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(7))
    threshold = between(max_prob(hf_layer_logits(model, seqs)[1]), 0.5, gap=1e-5)
    runs = []
    for backbone in (model, fallback):
        dec = EarlyExitDecoder(backbone, 1, 16, [1], [threshold], kv_mode="propagate")
        dec.prefill(seqs[:, :3])
        runs.append([dec.step(seqs[:, t]) for t in range(3, 16)])
    exits = [int(out.exit_layer) for out in runs[0]]
    assert exits == [int(out.exit_layer) for out in runs[1]] and 1 in exits and 4 in exits
    for fast, plain in zip(*runs):
        assert (fast.logits - plain.logits).abs().max().item() <= 1e-5
