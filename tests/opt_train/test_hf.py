import json
import random

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from data_pipeline.ownership import NotOursError
from opt_train.config import ModelConfig
from opt_train.model.hf import load_hf
from opt_train.model.opt import OPT
from opt_train.tools.hf_export import save_hf


def random_config(seed: int, pre_ln: bool) -> ModelConfig:
    """Shapes drawn at random, so parity holds for configs nobody wrote down."""
    r = random.Random(seed)
    heads = r.choice([1, 2, 4, 8])
    d = heads * r.choice([4, 8, 16])
    return ModelConfig(
        vocab_size=r.randrange(50, 300),
        n_layers=r.randint(1, 4),
        n_heads=heads,
        d_model=d,
        ffn_dim=r.choice([d, 2 * d, 4 * d, 3 * d + 5]),
        max_positions=r.choice([16, 40, 64]),
        word_embed_proj_dim=None if pre_ln else r.choice([d // 2, d, 2 * d]),
        pre_layer_norm=pre_ln,
        dropout=0.1,
        attention_dropout=0.1,
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the 0.006 init (and nonzero biases, LN), so differences would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + seed)


# fp32 logits of O(1-10) through the same ops in another order: < 1e-4 absolute.
ATOL = 1e-4


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pre_ln", [True, False], ids=["pre-LN", "350m-style"])
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path, seed, pre_ln):
    cfg = random_config(seed, pre_ln)
    ours = OPT(cfg)
    randomize(ours, seed)
    ours.eval()
    save_hf(ours, cfg, tmp_path)
    hf = OPTForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_positions), generator=_gen(seed))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < ATOL


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pre_ln", [True, False], ids=["pre-LN", "350m-style"])
def test_load_hf_matches_transformers_logits(seed, pre_ln):
    cfg = random_config(100 + seed, pre_ln)
    hf_cfg = OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        ffn_dim=cfg.ffn,
        num_attention_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_positions,
        do_layer_norm_before=pre_ln,
        word_embed_proj_dim=cfg.embed_dim,
    )
    hf = OPTForCausalLM(hf_cfg)
    randomize(hf, seed)
    hf.tie_weights()
    hf.eval()
    ours, ours_cfg = load_hf(hf)
    assert ours_cfg.pre_layer_norm == pre_ln and ours_cfg.embed_dim == cfg.embed_dim
    x = torch.randint(0, cfg.vocab_size, (3, cfg.max_positions), generator=_gen(seed))
    with torch.no_grad():
        diff = (ours.eval()(x) - hf(x).logits).abs().max().item()
    assert diff < ATOL


def test_round_trip_through_a_directory_is_exact(tmp_path):
    cfg = random_config(7, True)
    ours = OPT(cfg)
    randomize(ours, 7)
    save_hf(ours, cfg, tmp_path)
    back, back_cfg = load_hf(tmp_path)
    assert back_cfg.n_layers == cfg.n_layers and back_cfg.ffn == cfg.ffn
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


# -- load_hf refuses what the project model cannot represent ---------------------------------


def _tiny_hf_config(**kw) -> OPTConfig:
    base = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=16,
        word_embed_proj_dim=16,
    )
    return OPTConfig(**(base | kw))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation_function": "gelu"}, "only ReLU OPT models are supported, got gelu"),
        ({"_remove_final_layer_norm": True}, "_remove_final_layer_norm=True are not supported"),
        ({"enable_bias": False}, "without biases or LayerNorm affine parameters"),
        ({"layer_norm_elementwise_affine": False}, "without biases or LayerNorm affine"),
    ],
)
def test_load_hf_refuses_configs_it_cannot_represent(change, message):
    from opt_train.model.hf import model_config_from_hf

    with pytest.raises(ValueError, match=message):
        model_config_from_hf(_tiny_hf_config(**change))


def test_load_hf_refuses_an_untied_output_projection():
    hf = OPTForCausalLM(_tiny_hf_config(tie_word_embeddings=False))
    with torch.no_grad():
        hf.lm_head.weight.add_(1.0)
    with pytest.raises(ValueError, match="lm_head is not tied to embed_tokens"):
        load_hf(hf)


def test_load_hf_refuses_a_foreign_parameter_name():
    from opt_train.model.hf import from_hf_state_dict

    with pytest.raises(KeyError, match="unexpected parameter 'encoder.layers.0.fc1.weight'"):
        from_hf_state_dict({"encoder.layers.0.fc1.weight": torch.zeros(1)})


# -- export: tokenizer, ids, dtype, shards ---------------------------------------------------


def _opt_shards(tmp_path, opt_tokenizer_dir, texts: list[str]):
    from data_pipeline.shards import ShardWriter
    from data_pipeline.tokenizer import Tokenizer, TokenizerSpec

    tok = Tokenizer(TokenizerSpec("opt", str(opt_tokenizer_dir)))
    with ShardWriter(tmp_path / "shards", tok.describe()) as w:
        for i, t in enumerate(texts):
            w.add(tok.encode(t), "validation" if i % 2 else "train")
    return tok


def test_export_with_opt_tokenizer_writes_the_users_files_and_opt_ids(tmp_path, opt_tokenizer_dir):
    from transformers import AutoTokenizer, GenerationConfig

    texts = ["Anna has a red ball.", "Two plus three is five, and ünïcode 😀 too."]
    ours_tok = _opt_shards(tmp_path, opt_tokenizer_dir, texts)
    cfg = random_config(3, True)
    cfg.vocab_size = 50272
    model = OPT(cfg)
    save_hf(model, cfg, tmp_path / "hf", tokenizer=ours_tok.describe())
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 2, 1, 3)
    for t in texts:
        assert tok(t).input_ids == [2, *ours_tok.encode(t).tolist()]
    gen = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (2, 2, 1)
    hf_cfg = OPTConfig.from_pretrained(tmp_path / "hf")
    assert (hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.pad_token_id) == (2, 2, 1)


def test_export_refuses_tokenizer_files_other_than_those_that_made_the_data(
    tmp_path, opt_tokenizer_dir
):
    import shutil

    ours_tok = _opt_shards(tmp_path, opt_tokenizer_dir, ["a b c"])
    record = ours_tok.describe()
    moved = tmp_path / "edited-tokenizer"
    shutil.copytree(opt_tokenizer_dir, moved)
    with open(moved / "merges.txt", "a", encoding="utf-8") as f:
        f.write("a b\n")
    record["path"] = str(moved)
    cfg = random_config(3, True)
    cfg.vocab_size = 50272
    with pytest.raises(ValueError, match="merges.txt is not the file that tokenized"):
        save_hf(OPT(cfg), cfg, tmp_path / "hf", tokenizer=record)
    assert not (tmp_path / "hf").exists()  # nothing half-written where transformers looks


def test_export_cli_writes_bf16_shards_with_an_index(tmp_path, small_shards):
    from safetensors import safe_open

    from opt_train.tools.hf_export import main
    from opt_train.train.trainer import Trainer
    from tests.opt_train.conftest import small_job

    run = tmp_path / "run"
    t = Trainer(small_job(run, small_shards, "train.max_steps=1"))
    t.fit()
    t.close()
    out = tmp_path / "hf"
    main([str(run), str(out), "export.dtype=bf16", "export.max_shard_size=20KB"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    total = 0
    for f in files:
        with safe_open(out / f, "pt") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        assert all(v.dtype == torch.bfloat16 for v in tensors.values())
        size = sum(v.numel() * 2 for v in tensors.values())
        assert size <= 20_000 or len(tensors) == 1  # one tensor may exceed the limit alone
        total += size
    assert index["metadata"]["total_size"] == total
    assert (out / "generation_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = OPTForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 512, (2, 16), generator=_gen(0))
    with torch.no_grad():
        ref = t.model.eval()(x)
        # bf16 weights: 8-bit mantissas, ~4e-3 relative per weight, through two layers
        torch.testing.assert_close(hf(x).logits, ref, rtol=0, atol=3e-2 * ref.abs().max().item())


# -- the whole round trip --------------------------------------------------------------------


@pytest.mark.slow
def test_round_trip_train_export_transformers_and_init_from(tmp_path, tiny_corpus_cache):
    """Train on the default pipeline's data -> export -> AutoTokenizer and OPTForCausalLM ->
    the exported model's loss on the held-out documents is the run's val_loss -> a run with
    model.init_from of the export starts at that model's loss."""
    from transformers import AutoTokenizer, GenerationConfig

    from data_pipeline.shards import iter_documents, read_manifest
    from opt_train.data.loader import GlobalOrderLoader, PackedWindows, resolve_data_path
    from opt_train.tools.hf_export import export_checkpoint
    from opt_train.train.trainer import Trainer
    from tests.opt_train.conftest import make_config

    common = [
        f"data.cache_dir={tiny_corpus_cache}",
        # fp32 and no dropout, so both sides compute the same function: differences are
        # fp32 reductions in another order, ~1e-6 relative
        "precision=fp32",
        "model.dropout=0.0",
        "model.attention_dropout=0.0",
        # narrower than the default's 128 (a quarter of the LM head's work a step); the loss
        # still falls by over 2 nats in 20 steps (not at 32: 1.9)
        "model.d_model=64",
        "model.n_heads=4",
        "logging.wandb=disabled",
        "logging.progress=false",
        "logging.peak_tflops=1",
    ]
    run = tmp_path / "run"
    t = Trainer(
        make_config(f"run_dir={run}", "train.max_steps=20", "train.eval_interval=20", *common)
    )
    t.fit()
    t.close()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r for r in rows if "val_loss" in r][-1]["val_loss"]
    first_loss = rows[0]["loss"]

    out = tmp_path / "hf"
    report = export_checkpoint(run, out)
    assert report["tokenizer"] == "gpt2" and report["step"] == 20
    data = resolve_data_path(None, str(tiny_corpus_cache))
    sep = read_manifest(data)["eos_id"]
    tok = AutoTokenizer.from_pretrained(out)
    hf = OPTForCausalLM.from_pretrained(out).eval()
    gen = GenerationConfig.from_pretrained(out)
    assert sep == 50256
    assert tok.eos_token_id == tok.bos_token_id == hf.config.eos_token_id == gen.eos_token_id == sep
    assert tok.pad_token_id == hf.config.pad_token_id == 50257  # an unused padding row

    # The held-out documents as text, through the exported tokenizer: it gives the shards' ids
    # (after the separator it prepends), and their stream is the one the run evaluated on.
    stream: list[int] = []
    for ids in iter_documents(data, "validation"):
        enc = tok(tok.decode(ids)).input_ids
        assert enc == [sep, *ids.tolist()]
        stream += [*enc[1:], sep]
    seq, n = 128, 8 * 4  # data.seq_len; micro-batch 8 x train.eval_batches 4 on one rank
    windows = torch.tensor([stream[i * seq : i * seq + seq + 1] for i in range(n)])
    with torch.no_grad():
        logits = hf(windows[:, :-1]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert hf_loss.item() == pytest.approx(val_loss, rel=1e-5)

    # A fresh run from the export: its first step's loss (taken before the optimizer step) is
    # the exported model's loss on the first batch, far below a random init's ln(50272).
    loader = GlobalOrderLoader(PackedWindows(data, "train", seq), 0, 8, 8)
    ((inputs, targets),) = loader.next_step()
    with torch.no_grad():
        logits = hf(inputs.long()).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.long().flatten())
    run2 = tmp_path / "from-hf"
    t2 = Trainer(
        make_config(f"run_dir={run2}", f"model.init_from={out}", "train.max_steps=1", *common)
    )
    t2.fit()
    t2.close()
    got = json.loads((run2 / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert got == pytest.approx(expected.item(), rel=1e-5)
    assert got < first_loss - 2.0


def test_export_replaces_an_earlier_export_but_never_another_directory(tmp_path):
    cfg = random_config(1, True)
    save_hf(OPT(cfg), cfg, tmp_path / "hf")
    save_hf(OPT(cfg), cfg, tmp_path / "hf")  # again: replaced
    assert OPTForCausalLM.from_pretrained(tmp_path / "hf") is not None
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(NotOursError, match="is not an opt-train export"):
        save_hf(OPT(cfg), cfg, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
