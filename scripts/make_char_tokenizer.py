"""Write the character-level tokenizer that `model=tiny` ships (rlx/assets/char_tokenizer).

    python scripts/make_char_tokenizer.py

One token per printable ASCII character plus newline and four specials. A character
vocabulary keeps the tiny model honest on arithmetic (every digit is its own token)
and covers the Shakespeare corpus; anything else maps to <unk>. The files are plain
`tokenizers` JSON, so `AutoTokenizer.from_pretrained` loads them without rlx.
"""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
OUT = Path(__file__).resolve().parents[1] / "rlx" / "assets" / "char_tokenizer"


def build() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    # BPE with no merges is a character model that maps unknown characters to <unk>.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


if __name__ == "__main__":
    build().save_pretrained(OUT)
    print(f"wrote {OUT}")
