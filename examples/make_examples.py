#!/usr/bin/env python3
"""Build the tiny example checkpoints used by the README's first command.

    python examples/make_examples.py [--out examples]

- base-model/      a tiny Llama (hidden size 32) with a byte-level BPE tokenizer: the base
- chat-finetune/   a "community fine-tune" of it: same tokens but ids in another order, two
                   chat tokens (<|im_start|>, <|im_end|>) added, embedding padded to 64 rows
- merge.yaml       a mergekit linear merge of the two (which needs a remap first)

Deterministic: the same files come out every time (seeded training and weights).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Merging language models adds their weight matrices row by row,",
    "so every model in a merge must use the same token to id order.",
    "def add(a, b):\n    return a + b\n",
    "日本語のテキストも少し。Numbers: 1 2 3 10 100 2026.",
] * 20
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def train_tokenizer() -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIALS, show_progress=False
    )
    tokenizer.train_from_iterator(TEXT, trainer)
    return json.loads(tokenizer.to_str())


def chat_variant(base: dict) -> dict:
    """Shuffle the regular ids and append the chat tokens, as fine-tunes do."""
    data = json.loads(json.dumps(base))
    vocab = data["model"]["vocab"]
    regular = [t for t in vocab if t not in SPECIALS]
    ids = [vocab[t] for t in regular]
    random.Random(7).shuffle(ids)
    vocab.update(zip(regular, ids))
    for token in CHAT_TOKENS:
        vocab[token] = len(vocab)
        data["added_tokens"].append(
            {
                "id": vocab[token],
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    return data


def write_model(directory: Path, tokenizer_json: dict, rows: int, seed: int, chat_template: str | None = None) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = tokenizer_json["model"]["vocab"]
    config = LlamaConfig(
        vocab_size=rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=vocab[SPECIALS[0]],
        eos_token_id=vocab[CHAT_TOKENS[1]] if chat_template else vocab[SPECIALS[1]],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="40KB")
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[0],
        "eos_token": CHAT_TOKENS[1] if chat_template else SPECIALS[1],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
    }
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    base = train_tokenizer()
    chat = chat_variant(base)
    write_model(args.out / "base-model", base, rows=len(base["model"]["vocab"]), seed=1)
    write_model(args.out / "chat-finetune", chat, rows=384, seed=2, chat_template=CHAT_TEMPLATE)
    (args.out / "merge.yaml").write_text(
        "# Linear merge of the two example models. Run the remap first (see README.md):\n"
        "# chat-finetune's token ids are in another order, so merging it as is mixes up rows.\n"
        "merge_method: linear\n"
        "base_model: examples/base-model\n"
        "models:\n"
        "  - model: examples/base-model\n"
        "    parameters:\n"
        "      weight: 0.5\n"
        "  - model: examples/chat-finetune\n"
        "    parameters:\n"
        "      weight: 0.5\n"
        "dtype: float32\n",
        encoding="utf-8",
    )
    print(f"wrote {args.out / 'base-model'}, {args.out / 'chat-finetune'} and {args.out / 'merge.yaml'}")


if __name__ == "__main__":
    main()
