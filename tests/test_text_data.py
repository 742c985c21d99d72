"""`data=text_file`: local text (a file or a directory of .txt/.jsonl) cut into token windows, with a real local
tokenizer (built here with the `tokenizers` library and loaded back through transformers' AutoTokenizer, offline) or
UTF-8 bytes; synthetic tokens with a warning when no path is given; clear errors, at construction, for bad paths.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lit_optim.errors import HyperparameterError, MissingPathError
from lit_optim.task.data import SyntheticTextDataModule
from lit_optim.task.text_data import TextFileDataModule

WORDS = ("the quick brown fox jumps over a lazy dog while small optimizers keep their state in eight bits and "
         "the model learns to predict the next token").split()


def corpus(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx) + "\n"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real word-level tokenizer saved the way a model directory holds one (tokenizer.json + config)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([corpus(500, 0)], tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    out = tmp_path_factory.mktemp("tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(out)
    return out


def test_bytes_from_one_text_file(tmp_path):
    text = corpus(400, 1)
    path = tmp_path / "notes.md"  # a file named explicitly is read as text whatever its suffix
    path.write_text(text)
    dm = TextFileDataModule(path=str(path), tokenizer=None, vocab_size=256, seq_len=16, batch_size=4,
                            val_fraction=0.1)
    dm.setup("fit")
    raw = torch.tensor(list(text.encode()))
    train = torch.cat([dm.train_set[i][:-1] for i in range(len(dm.train_set))])
    assert torch.equal(train, raw[: len(train)])
    val_start = len(dm.train_set) * 16
    assert torch.equal(dm.val_set[0], raw[val_start : val_start + 17])
    assert len(dm.val_set) == max(1, round((len(raw) - 1) // 16 * 0.1))
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 17) and batch.dtype == torch.long


def test_directory_of_txt_and_jsonl_with_a_local_tokenizer(tmp_path, tokenizer_dir):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text(corpus(50, 2))
    records = [{"text": corpus(30, 3), "id": 1}, {"text": corpus(20, 4), "id": 2}]
    (data / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (data / "ignored.md").write_text("not read: only .txt and .jsonl below a directory")
    dm = TextFileDataModule(path=str(data), tokenizer=str(tokenizer_dir), vocab_size=1000, seq_len=8, batch_size=2)
    assert [f.name for f in dm.files] == ["a.txt", "b.jsonl"]
    tokens = dm.tokenize_files()
    eos = dm.tokenizer.eos_token_id
    assert (tokens == eos).sum() == 3  # one end-of-document token per document: the .txt file and two records
    docs = dm.tokenizer.decode(tokens.tolist()).split("</s>")
    expected = [corpus(50, 2), records[0]["text"], records[1]["text"]]
    assert [d.split() for d in docs[:3]] == [e.split() for e in expected]
    dm.setup("fit")
    assert int(torch.stack([dm.train_set[i] for i in range(len(dm.train_set))]).max()) < len(dm.tokenizer)


def test_no_path_warns_and_uses_the_synthetic_tokens():
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        dm = TextFileDataModule(path=None, tokenizer="/ignored/without/a/path", vocab_size=64, seq_len=16,
                                synthetic_train_tokens=2048, synthetic_val_tokens=256, seed=7)
    dm.setup("fit")
    ref = SyntheticTextDataModule(vocab_size=64, seq_len=16, train_tokens=2048, val_tokens=256, seed=7)
    ref.setup("fit")
    assert torch.equal(dm.train_set.tokens, ref.train_set.tokens) and torch.equal(dm.val_set.tokens, ref.val_set.tokens)


def test_bad_paths_fail_at_construction(tmp_path, tokenizer_dir):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    with pytest.raises(MissingPathError, match=r"data.path='.*missing.txt' does not exist"):
        TextFileDataModule(path=str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match="without .txt or .jsonl"):
        TextFileDataModule(path=str(tmp_path / "empty"))
    with pytest.raises(MissingPathError, match="data.tokenizer=.* is not a directory"):
        TextFileDataModule(path=str(text), tokenizer=str(tmp_path / "no_tokenizer"))
    with pytest.raises(MissingPathError, match="no usable tokenizer"):
        TextFileDataModule(path=str(text), tokenizer=str(tmp_path / "empty"))
    with pytest.raises(HyperparameterError, match="vocab_size is 16"):
        TextFileDataModule(path=str(text), tokenizer=str(tokenizer_dir), vocab_size=16)
    with pytest.raises(HyperparameterError, match="UTF-8 bytes"):
        TextFileDataModule(path=str(text), tokenizer=None, vocab_size=128)


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    dm = TextFileDataModule(path=str(path), tokenizer=None, seq_len=4)
    with pytest.raises(MissingPathError, match=r"c.jsonl:2: no string field 'text'"):
        dm.setup("fit")


def test_too_little_text_for_one_window(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    dm = TextFileDataModule(path=str(path), tokenizer=None, seq_len=64)
    with pytest.raises(HyperparameterError, match="too few for one window"):
        dm.setup("fit")


def test_missing_weights_directory_is_an_error_not_random_weights(tmp_path):
    pytest.importorskip("transformers")
    from test_recipes import compose_recipe

    from lit_optim.train import build_run

    cfg = compose_recipe("llama31_8b_adamw_8bit", tmp_path, "logger=csv", "trainer.accelerator=cpu",
                         f"model.pretrained={tmp_path / 'no-such-model'}")
    with pytest.raises(MissingPathError, match=r"model.pretrained=.*no-such-model' is not a directory"):
        build_run(cfg)  # fails at once: no 8B model is built on the way


def test_seed_recipe_with_real_weights_and_real_data(tmp_path, tokenizer_dir):
    """`recipe=llama31_8b_paged_adamw_8bit model.pretrained=<dir> data.path=<file>`: weights, tokenizer and text all
    come from local files; the model is a tiny Llama saved in the Hugging Face layout."""
    transformers = pytest.importorskip("transformers")
    from test_recipes import compose_recipe, shrink

    from lit_optim.train import build_run, train

    model_dir = tmp_path / "tiny-llama"
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(0)
    saved = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None))
    saved.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = tmp_path / "corpus.jsonl"
    text.write_text("\n".join(json.dumps({"text": corpus(60, s)}) for s in range(20)))

    cfg = compose_recipe("llama31_8b_paged_adamw_8bit", tmp_path / "run", "logger=csv",
                         f"model.pretrained={model_dir}", f"data.path={text}")
    shrink(cfg)
    module, datamodule, _ = build_run(cfg)
    assert module.model is None  # built by Lightning's configure_model hook, on the training device
    module.configure_model()
    assert module.model.config.hidden_size == 64  # from the directory's config.json, not the recipe's 4096
    assert module.model.training  # from_pretrained leaves eval mode (dropout off), which Lightning would keep
    # The recipe loads in bf16 (model.dtype): the real weights, rounded to bf16 -- not a random init.
    loaded, real = module.model.state_dict(), saved.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in loaded.values() if v.is_floating_point())
    assert all(torch.equal(loaded[k], real[k].to(loaded[k].dtype)) for k in real)
    assert datamodule.tokenizer is not None and len(datamodule.tokenizer) == len(tok)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2


def test_tiny_text_file_recipe_on_own_text(tmp_path):
    from test_recipes import compose_recipe, shrink

    from lit_optim.train import train

    text = tmp_path / "notes.txt"
    text.write_text(corpus(2000, 5))
    cfg = compose_recipe("tiny_lm_text_file", tmp_path / "run", "logger=csv", f"data.path={text}")
    shrink(cfg)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
