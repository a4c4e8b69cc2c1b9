"""Tiny random models and tokenizers built in memory, for fast unit tests.

Every supported architecture gets a 3-layer, d_model=64 model over a small
word-level vocabulary; two chat templates (Qwen ChatML and Llama 3) make the
position logic testable without downloading anything.

Saved with ``save_pretrained``, the tokenizer's ``tokenizer_config.json``
names the generic fast class, and :func:`steerlab.model.loading.load_tokenizer`
(used by ``load_model``) reloads it from ``tokenizer.json`` as it was, even
beside a qwen2 ``config.json`` (where transformers 5's ``AutoTokenizer``
would rebuild it as Qwen2's BPE).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from steerlab.model.architectures import architecture_for
from steerlab.model.loading import LoadedModel

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
SPECIALS = {
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama3": [
        "<|end_of_text|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
}
WORDS = [
    "a",
    "an",
    "the",
    "is",
    "are",
    "was",
    "be",
    "to",
    "of",
    "and",
    "or",
    "in",
    "on",
    "at",
    "for",
    "with",
    "how",
    "what",
    "why",
    "who",
    "where",
    "when",
    "can",
    "i",
    "you",
    "we",
    "they",
    "he",
    "she",
    "it",
    "my",
    "your",
    "do",
    "does",
    "make",
    "build",
    "write",
    "explain",
    "tell",
    "me",
    "give",
    "steps",
    "please",
    "help",
    "bomb",
    "weapon",
    "cake",
    "bread",
    "poem",
    "story",
    "code",
    "python",
    "function",
    "list",
    "sort",
    "number",
    "safe",
    "safety",
    "danger",
    "dangerous",
    "harm",
    "harmful",
    "harmless",
    "kill",
    "process",
    "steal",
    "money",
    "bank",
    "account",
    "hack",
    "computer",
    "password",
    "email",
    "friend",
    "teacher",
    "cat",
    "dog",
    "house",
    "car",
    "city",
    "river",
    "mountain",
    "sky",
    "blue",
    "red",
    "green",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "yes",
    "no",
    "not",
    "sorry",
    "cannot",
    "assist",
    "with",
    "that",
    "here",
    "sure",
    "answer",
    "question",
    "system",
    "user",
    "assistant",
    "helpful",
    "model",
    "refuse",
    "comply",
    "rule",
    "rules",
    "persona",
    "kind",
    "cruel",
    "careful",
    "bold",
    "hello",
    "world",
    "test",
    "data",
    "prompt",
]
PUNCT = [*".,?!:;'\"()-_/", "\n", "\n\n", " ", "  "]


def tiny_tokenizer(template: str = "qwen") -> PreTrainedTokenizerFast:
    """A word-level tokenizer with real special tokens and a real chat template."""
    specials = SPECIALS[template]
    vocab: dict[str, int] = {}
    for tok in ["<unk>", *specials, *PUNCT, *WORDS, *[str(d) for d in range(10)]]:
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+|\s+|\w+|[^\w\s]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    eos = specials[2] if template == "qwen" else "<|eot_id|>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token=eos,
        pad_token=specials[0],
        additional_special_tokens=[s for s in specials if s not in (eos, specials[0])],
    )
    tok.chat_template = QWEN_TEMPLATE if template == "qwen" else LLAMA3_TEMPLATE
    tok.padding_side = "left"
    return tok


_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

CONFIGS = {
    "llama": lambda v: LlamaConfig(vocab_size=v, **_COMMON),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, **_COMMON),
    "qwen3": lambda v: Qwen3Config(vocab_size=v, head_dim=16, **_COMMON),
    "mistral": lambda v: MistralConfig(vocab_size=v, **_COMMON),
    "gemma2": lambda v: Gemma2Config(vocab_size=v, head_dim=16, **_COMMON),
    "gemma3": lambda v: Gemma3TextConfig(vocab_size=v, head_dim=16, **_COMMON),
    "phi3": lambda v: Phi3Config(vocab_size=v, pad_token_id=0, **_COMMON),
    "olmo2": lambda v: Olmo2Config(vocab_size=v, pad_token_id=0, **_COMMON),
}
ARCH_NAMES = list(CONFIGS)


def tiny_model(
    arch: str = "qwen2",
    *,
    template: str = "qwen",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """A randomly initialised ``arch`` model wrapped as a LoadedModel."""
    tok = tiny_tokenizer(template)
    torch.manual_seed(seed)
    config = CONFIGS[arch](len(tok))
    config.pad_token_id = tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    config.bos_token_id = None
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _perturb_norms(model, seed)
    model.eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return LoadedModel(
        model=model,
        tokenizer=tok,
        arch=architecture_for(model),
        spec=f"tiny-{arch}",
        dtype=dtype,
        dtype_reason="test",
    )


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Give norm weights non-uniform values so tests see what trained models have."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))


def save_tiny(lm: LoadedModel, path: str | Path) -> Path:
    """Save a tiny model and its tokenizer as a Hugging Face folder (for CLI/subprocess tests)."""
    folder = Path(path)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder
