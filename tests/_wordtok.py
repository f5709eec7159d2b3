"""A word-level tokenizer built in memory (nothing downloaded) for the tiny test models, with a
chat template, so string prompts, `LabelledPrompts`, `Splits`, `Task` and chat formatting can
be tested without a real model."""

from __future__ import annotations

WORDS = (
    "good great fine nice happy love best fun bad awful poor sad hate worst dull boring "
    "the movie film was is a very not and it plot story acting user assistant system : ."
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} : {{ m['content'] }} .{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant :{% endif %}"
)


def word_tokenizer(d_vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= d_vocab
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    # TransformerLens rebuilds tokenizers without add_bos_token from their name; this one has
    # no name on the Hub, and does not add BOS itself (TransformerLens prepends it).
    fast.init_kwargs["name_or_path"] = "steerlin-test-wordtok"
    fast.init_kwargs["add_bos_token"] = True
    return fast


def with_tokenizer(model):
    """`model` (built for this test) with the word tokenizer attached; returns it."""
    tok = word_tokenizer(model.cfg.d_vocab)
    if type(model).__name__ == "TransformerBridge":  # TransformerLens 4: a plain attribute
        tok.padding_side = "right"
        model.tokenizer = tok
        return model
    model.set_tokenizer(tok, default_padding_side="right")
    return model


POS = [
    "good movie",
    "great film",
    "nice plot",
    "happy story",
    "the best acting",
    "love it",
    "fun film",
    "fine movie",
    "very good plot",
    "great acting",
]
NEG = [
    "bad movie",
    "awful film",
    "poor plot",
    "sad story",
    "the worst acting",
    "hate it",
    "dull film",
    "boring movie",
    "very bad plot",
    "awful acting",
]
