import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("LIBORTHO_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data"


def tiny_config(arch: str):
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config
    common = dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "llama-tied":
        return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64, **common)
    raise ValueError(arch)


ARCHS = ["llama", "llama-tied", "qwen2", "gpt2", "opt"]


def tiny_model(arch: str, seed: int = 0):
    from libortho.compat import from_config
    torch.manual_seed(seed)
    model = from_config(tiny_config(arch))
    # random init is tiny (std 0.02): widen it so quantization error is visible in tests
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def char_tokenizer(vocab_size=256):
    """One token per character (so one per digit), ids < 256 to fit the tiny models' vocabulary."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    while len(vocab) < vocab_size:
        vocab[chr(0x100 + len(vocab))] = len(vocab)  # one character per token
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def pdl_env(mode: str) -> dict:
    """The PDL variables a test sets to run LibOrtho's kernels in $LIBORTHO_PDL `mode` at every M, or none for
    "default" (the library's own choice: "first" for one-row calls on Hopper)."""
    return {} if mode == "default" else {"LIBORTHO_PDL": mode, "LIBORTHO_PDL_MAX_M": "none"}


def set_pdl(monkeypatch, mode: str) -> None:
    """Sets pdl_env(mode) for this test, the other PDL variable cleared."""
    for name in ("LIBORTHO_PDL", "LIBORTHO_PDL_MAX_M"):
        monkeypatch.delenv(name, raising=False)
    for name, value in pdl_env(mode).items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CI machine threads thrash."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def smollm2():
    import libortho
    return libortho.load_model("smollm2")
