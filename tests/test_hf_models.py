"""FLoRAL on Hugging Face ``transformers`` models: tiny randomly initialised BERT and Llama built
from configs (no download). Wrapping by module name, the model's own forward signature
(``input_ids``/``attention_mask`` keyword arguments), a training step on a frozen base, the
shared/private split (frozen keys and tied duplicates never on the wire), ``merge()`` keeping tied
weights tied, and the merged model as a real Hugging Face checkpoint (save/load round trip).

Skipped when ``transformers`` is not installed (``pip install -e ".[text]"``)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from floral_flwr.floral import Floral  # noqa: E402

BERT_QV = ["*.query", "*.value"]
LLAMA_PROJ = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def tiny_bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=40,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
                                   tie_word_embeddings=True)
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(cfg).eval()


def batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def randomize_adaptors(fm: Floral, seed: int = 5) -> None:
    """Non-zero adaptors and a non-uniform mixture, so every fold is visible in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adaptor in fm.adaptor_modules().values():
            for p in adaptor.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        fm.mixture.logits.copy_(torch.randn(fm.mixture.logits.shape, generator=g))


def hand_folded(fm: Floral, plain: torch.nn.Module) -> torch.nn.Module:
    """``plain`` (an unwrapped copy of the base) with W + alpha sum_c p_c B_c A_c (and the
    adaptive bias) written into each adapted layer, from the shared state's factors: an
    independent computation of what the wrapped model must compute in eval mode."""
    p = fm.probs()
    sd = fm.shared_state_dict()
    out = copy.deepcopy(plain)
    with torch.no_grad():
        for name in fm.layer_names:
            a, b = sd[f"adaptor.{name}.in"], sd[f"adaptor.{name}.out"]  # (C, r, d_in), (C, d_out, r)
            layer = out.get_submodule(name)
            layer.weight += fm.alpha * sum(p[c] * b[c] @ a[c] for c in range(fm.num_adaptors))
            if f"adaptor.{name}.bias" in sd:
                layer.bias += fm.alpha * (p[:, None] * sd[f"adaptor.{name}.bias"]).sum(0)
    return out


# ---------------------------------------------------------------------------------- wrapping


def test_bert_wrapped_by_module_name_with_its_own_forward_signature():
    plain = tiny_bert()
    fm = Floral(copy.deepcopy(plain), num_adaptors=3, rank=2, include=BERT_QV).eval()
    assert fm.layer_names == [f"encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")]
    randomize_adaptors(fm)
    x = batch(97)
    out = fm(**x)  # keyword arguments of BertModel.forward, its ModelOutput back
    assert isinstance(out, transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions)
    ref = hand_folded(fm, plain)(**x).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    # and the adaptors matter: the unadapted base gives something else
    assert (plain(**x).last_hidden_state - ref).abs().max() > 1e-2


def test_llama_projections_wrapped_tied_head_skipped():
    plain = tiny_llama()
    fm = Floral(copy.deepcopy(plain), num_adaptors=2, rank=2).eval()  # every nn.Linear by default
    assert fm.layer_names == [f"model.layers.{i}.{blk}.{n}" for i in range(2)
                              for blk, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                                 ("mlp", ("gate_proj", "up_proj", "down_proj")))
                              for n in names]
    assert ("lm_head", "Linear (tied to model.embed_tokens)") in fm.skipped
    same = Floral(copy.deepcopy(plain), num_adaptors=2, rank=2, include=LLAMA_PROJ)
    assert same.layer_names == fm.layer_names
    randomize_adaptors(fm)
    x = batch(101)
    torch.testing.assert_close(fm(**x).logits, hand_folded(fm, plain)(**x).logits, rtol=1e-5, atol=1e-5)


def test_exclude_by_module_name():
    fm = Floral(tiny_llama(), num_adaptors=2, rank=1, exclude=["*.mlp.*", "*.k_proj"])
    assert fm.layer_names == [f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj", "o_proj")]


def test_bad_module_names_give_one_clear_message():
    with pytest.raises(ValueError, match=r"include pattern '\*\.q_proj' matches no module of BertModel.*"
                                         r"'embeddings.word_embeddings'"):
        Floral(tiny_bert(), include=["*.query", "*.q_proj"])
    with pytest.raises(ValueError, match=r"exclude pattern 'decoder' matches no module"):
        Floral(tiny_bert(), exclude="decoder")
    with pytest.raises(ValueError, match=r"'lm_head', whose weight is tied to 'model.embed_tokens'"):
        Floral(tiny_llama(), include=["*.q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"trainable pattern 'classifier\.\*' matches no base state key"):
        Floral(tiny_bert(), include=BERT_QV).freeze_base(trainable="classifier.*")


# ---------------------------------------------------------------------------------- frozen base


def test_training_step_on_a_frozen_base_moves_only_adaptors_mixture_and_head():
    plain = tiny_bert()
    fm = Floral(copy.deepcopy(plain), num_adaptors=2, rank=2, include=BERT_QV).freeze_base(trainable="pooler.*")
    randomize_adaptors(fm)
    base_before = {k: v.clone() for k, v in plain.state_dict().items()}
    shared_before = {k: v.clone() for k, v in fm.shared_state_dict().items()}
    logits_before = fm.mixture.logits.detach().clone()
    trainable = [p for p in fm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    fm.train()
    x = batch(97)
    target = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        loss = (fm(**x).pooler_output - target).pow(2).mean()
        loss.backward()
        opt.step()
    after = fm.shared_state_dict()
    assert set(after) == set(shared_before)
    # every shared tensor trained (the pooler head and each adaptor factor) ...
    moved = {k for k in after if not torch.equal(after[k], shared_before[k])}
    assert {k for k in after if k.startswith("adaptor.") and not k.endswith(".bias")} <= moved
    assert "base.pooler.dense.weight" in moved
    assert not torch.equal(fm.mixture.logits.detach(), logits_before)
    # ... and the frozen base did not move (its tensors, read through the wrapper's key map)
    for k, t in fm._base_items():
        if k in set(fm.frozen_keys):
            assert torch.equal(t, base_before[k]), k
            assert not t.requires_grad or not isinstance(t, torch.nn.Parameter)


def test_state_split_frozen_keys_and_tied_duplicates_stay_off_the_wire():
    fm = Floral(tiny_llama(), num_adaptors=2, rank=2, include=LLAMA_PROJ)
    shared = fm.shared_state_dict()
    # tied: one tensor, one key (the first one, as the model's state_dict lists it)
    assert "base.model.embed_tokens.weight" in shared and "base.lm_head.weight" not in shared
    fm.freeze_base(trainable="model.norm.*")
    shared = fm.shared_state_dict()
    assert sorted(k for k in shared if k.startswith("base.")) == ["base.model.norm.weight"]
    # frozen: every base key but the trainable norm and the tied duplicate
    assert set(fm.frozen_keys) == set(tiny_llama().state_dict()) - {"model.norm.weight", "lm_head.weight"}
    rep = fm.parameter_report()
    n_adaptor = sum(v.numel() for k, v in shared.items() if k.startswith("adaptor."))
    assert rep.bytes_up == 4 * (n_adaptor + 32)  # adaptors + the one trainable norm
    assert rep.frozen == rep.base - 32
    # a shared state carrying a frozen key is refused (the frozen base is never loaded)
    bad = dict(shared)
    bad["base.model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match="unexpected keys"):
        fm.load_shared_state_dict(bad)
    # the private state is the mixture only
    assert list(fm.private_state_dict()) == ["mixture.logits"]


def test_loading_a_tied_tensor_writes_both_places():
    fm = Floral(tiny_llama(), num_adaptors=2, rank=2, include=LLAMA_PROJ)
    sd = dict(fm.shared_state_dict())
    sd["base.model.embed_tokens.weight"] = torch.full_like(sd["base.model.embed_tokens.weight"], 0.25)
    fm.load_shared_state_dict(sd)
    assert torch.equal(fm.model.lm_head.weight, torch.full((101, 32), 0.25))


# ---------------------------------------------------------------------------------- merge / HF export


def test_merge_keeps_tied_weights_tied_and_loads_into_the_base_class(tmp_path):
    plain = tiny_llama()
    fm = Floral(copy.deepcopy(plain), num_adaptors=3, rank=2).eval()
    randomize_adaptors(fm)
    merged = fm.merge()
    assert type(merged) is type(plain)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in plain.parameters())
    x = batch(101)
    expected = fm(**x).logits
    torch.testing.assert_close(merged(**x).logits, expected, rtol=1e-5, atol=1e-5)
    # its state dict loads into a fresh base-class model with zero difference
    fresh = transformers.LlamaForCausalLM(plain.config).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    for (k, a), (_, b) in zip(sorted(merged.state_dict().items()), sorted(fresh.state_dict().items())):
        assert torch.equal(a, b), k
    assert torch.equal(fresh(**x).logits, merged(**x).logits)
    # and it is a real Hugging Face checkpoint
    merged.save_pretrained(tmp_path / "personal")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "personal").eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(back(**x).logits, merged(**x).logits)


def test_merged_bert_round_trips_through_save_pretrained(tmp_path):
    plain = tiny_bert()
    fm = Floral(copy.deepcopy(plain), num_adaptors=2, rank=3, include=BERT_QV).freeze_base().eval()
    randomize_adaptors(fm)
    merged = fm.merge()
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in plain.parameters())
    merged.save_pretrained(tmp_path / "bert")
    back = transformers.AutoModel.from_pretrained(tmp_path / "bert").eval()
    x = batch(97)
    with torch.no_grad():
        assert torch.equal(back(**x).last_hidden_state, merged(**x).last_hidden_state)
        torch.testing.assert_close(back(**x).last_hidden_state, fm(**x).last_hidden_state, rtol=1e-5, atol=1e-5)
    # the wrapper itself is untouched by merging
    assert fm.layer_names and all(hasattr(fm.model.get_submodule(n), "parametrizations") for n in fm.layer_names)
