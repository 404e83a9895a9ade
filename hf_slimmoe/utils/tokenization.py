"""The tokenizers hf_slimmoe makes itself (the built teacher's, tiny chat models'), and the chat template it ships.

- [`train_bpe_tokenizer`]: a byte-level BPE tokenizer trained on local text files, as a `PreTrainedTokenizerFast`.
- `CHAT_TEMPLATE`: Phi-style turns written as plain text (`<|user|>`, `<|assistant|>` ...), so it works with any
  tokenizer that has an EOS token; the assistant turn is wrapped in `{% generation %}` so `assistant_only_loss=True`
  works too. It is the packaged file `hf_slimmoe/templates/chat.jinja` (a recipe's `chat_template_path` can name it).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

ENDOFTEXT = "<|endoftext|>"
CHAT_TEMPLATE_FILE = "templates/chat.jinja"  # inside the package
CHAT_TEMPLATE = resources.files("hf_slimmoe").joinpath(CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


def chat_template_path() -> str:
    """The path of the packaged chat template file (for `chat_template_path` in a post-training recipe)."""
    return str(resources.files("hf_slimmoe").joinpath(CHAT_TEMPLATE_FILE))


def train_bpe_tokenizer(
    files: Sequence[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    bos_token: str | None = ENDOFTEXT,
    eos_token: str | None = ENDOFTEXT,
    pad_token: str | None = ENDOFTEXT,
    unk_token: str | None = None,
    chat_template: str | None = None,
):
    """
    A byte-level BPE tokenizer (GPT-2 style: every byte is in the alphabet, so nothing is unknown) trained on local
    text `files`, with `special_tokens` first in the vocabulary.

    Args:
        files (`Sequence[str]`): text files to train on.
        vocab_size (`int`): vocabulary size, special tokens included.
        special_tokens (`Sequence[str]`, *optional*, defaults to `("<|endoftext|>",)`): added first, in order.
        bos_token, eos_token, pad_token, unk_token (`str`, *optional*): roles of special tokens (the defaults make
            `<|endoftext|>` BOS, EOS and padding).
        chat_template (`str`, *optional*): a Jinja chat template for the tokenizer.

    Returns:
        `transformers.PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train(list(files), trainer)
    roles = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token,
             "chat_template": chat_template}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{k: v for k, v in roles.items() if v is not None})


__all__ = ["CHAT_TEMPLATE", "ENDOFTEXT", "chat_template_path", "train_bpe_tokenizer"]
