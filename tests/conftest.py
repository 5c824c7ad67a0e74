"""Shared fixtures: tiny random-weight models of several families and a tokenizer that needs no download."""

from __future__ import annotations

import pytest
import torch

WORDS = (
    "the a an of to in is was for on that with as by at from it be this are or which his her their "
    "capital city country france paris germany berlin italy rome spain madrid one two three four five "
    "six seven eight nine ten plus equals sum number word letter answer question yes no cat dog house"
).split()


def make_tokenizer():
    """A word-level fast tokenizer over a small vocabulary (unknown words -> [UNK]), no BOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for ch in "0123456789.,?!:;'\"-+=":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    return fast


# Tiny models are dominated by threading overhead: one thread is fastest, and leaves the other core free.
torch.set_num_threads(1)

TINY_VOCAB = 128


def tiny_model(family: str = "llama", n_layers: int = 3, seed: int = 0, bias: bool = False) -> torch.nn.Module:
    """A tiny random-weight causal LM of ``family`` (llama, gpt2, qwen2, opt, gpt_neox, mistral), in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=TINY_VOCAB)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=48, attention_bias=bias, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = tf.MistralConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=48, **common)
        model = tf.MistralForCausalLM(cfg)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=48, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=n_layers, n_head=4, n_positions=64, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = tf.OPTConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, ffn_dim=48,
                           word_embed_proj_dim=32, max_position_embeddings=64, **common)
        model = tf.OPTForCausalLM(cfg)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, intermediate_size=48,
                               max_position_embeddings=64, **common)
        model = tf.GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.float().eval()


@pytest.fixture
def all_cores():
    """For the tests on the embedded model: use every core, then go back to one."""
    import os

    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved 3-block tiny Llama with the test tokenizer: a folder for ``--model``."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", n_layers=3, seed=0).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def llama():
    return tiny_model("llama")


def pytest_configure(config):
    config.addinivalue_line("markers", "embedded: runs on the embedded SmolLM2-135M-Instruct model (slower)")
