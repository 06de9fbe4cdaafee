"""Tokenizers: characters, or a sentencepiece BPE / unigram model trained in memory.

Both map `str -> int32 ids -> str` and serialise to a small JSON dict, so a run directory carries its own
tokenizer (`save_tokenizer` / `load_tokenizer`) and sampling never depends on the training corpus being around.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import os

import numpy as np
import sentencepiece as spm
import tokenizers

from transformer.config import ConfigError, DataConfig, first_line
from transformer.files import write_json_atomic

# Text <-> an array of code points in one C call each way; "surrogatepass" so no Python str is unencodable.
_UTF32 = "utf-32-le"


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(_UTF32, "surrogatepass"), np.uint32)


def visible(text: str) -> str:
    """Whitespace drawn: a space as "␣", a newline as "↵", a tab as "⇥", any other unprintable character escaped
    ("\\r", "\\x0b"): how `piece` shows tokens."""
    drawn = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}
    return "".join(drawn.get(c) or (c if c.isprintable() else repr(c)[1:-1]) for c in text)


def _byte_level_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the other 68 for the
    characters from U+0100 on, in byte order (the table every byte-level BPE vocabulary is written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


BYTE_LEVEL = _byte_level_bytes()


def hex_bytes(data: bytes) -> str:
    return "".join(f"<0x{b:02X}>" for b in data)


class CharTokenizer:
    """One id per distinct character of the training text; ids follow code-point order. With `end_of_text`, one
    more id after them ends a document (prepared shards put it after each; sampling stops there)."""

    END_OF_TEXT = "<|endoftext|>"

    def __init__(self, chars: str, end_of_text: bool = False):
        if not chars:
            raise ConfigError("cannot build a char tokenizer from empty text")
        self._codepoints = np.unique(_codepoints(chars))  # sorted, so encode can binary-search it
        self.end_of_text = end_of_text

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def chars(self) -> str:
        return self._codepoints.tobytes().decode(_UTF32, "surrogatepass")

    @property
    def vocab_size(self) -> int:
        return len(self._codepoints) + self.end_of_text

    @property
    def eos_id(self) -> int | None:
        return len(self._codepoints) if self.end_of_text else None

    # Without an end-of-text id a character stream has no special tokens: training packs raw text and sampling
    # stops on length.
    bos_id = pad_id = None

    def encode(self, text: str) -> np.ndarray:
        cp = _codepoints(text)
        ids = np.searchsorted(self._codepoints, cp)
        found = self._codepoints[np.minimum(ids, len(self._codepoints) - 1)] == cp
        if not found.all():
            bad = chr(cp[np.argmin(found)])
            raise ConfigError(f"character {bad!r} is not in the vocabulary: the char tokenizer never saw it in the "
                              "training text")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64)
        if self.end_of_text:
            ids = ids[ids != self.eos_id]
        return self._codepoints[ids].tobytes().decode(_UTF32, "surrogatepass")

    def piece(self, i: int) -> str:
        """Token i as it reads, whitespace drawn."""
        return self.END_OF_TEXT if i == self.eos_id else visible(self.decode([i]))

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars, **({"end_of_text": True} if self.end_of_text else {})}

    def to_hf(self) -> "HFTokenizer":
        """The same tokenizer as a Hugging Face tokenizer.json (for export): a BPE model with one token per character
        and no merges splits any text into its characters, and the Fuse decoder joins them back."""
        tok = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(self.chars)}, []))
        tok.decoder = tokenizers.decoders.Fuse()
        if self.end_of_text:
            tok.add_special_tokens([self.END_OF_TEXT])  # the next id, as here
            return HFTokenizer(tok.to_str(), eos=self.END_OF_TEXT)
        return HFTokenizer(tok.to_str())


class SentencePieceTokenizer:
    """A sentencepiece model held as its serialised proto (so it round-trips through JSON without a file).

    Models trained here encode any text exactly: identity normalisation (the default NFKC rule turns newlines into
    spaces and folds runs of spaces), byte fallback for unseen characters, and "\\n" as a user-defined piece. Training
    sees lines, so no learned piece spans a newline; `encode` encodes the lines in one batched call (several times
    faster than one long input) and joins them with the "\\n" id, hence no dummy prefix (it would add a space after
    every newline). A model loaded with `from_file` keeps its own normalisation; if it has no "\\n" piece, newlines
    are lost (its dummy prefix usually leaves a space in their place).
    """

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except RuntimeError as e:
            raise ConfigError(f"not a valid sentencepiece model ({first_line(e)})") from None
        newline_id = self._sp.piece_to_id("\n")  # the unk id when there is no such piece
        self._newline_id = newline_id if self._sp.id_to_piece(newline_id) == "\n" else None

    @classmethod
    def train(cls, text: str, vocab_size: int, model_type: str = "bpe") -> "SentencePieceTokenizer":
        lines = [line for line in text.split("\n") if line]
        if not lines:
            raise ConfigError("cannot train a sentencepiece tokenizer on empty text")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["\n"], byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                hard_vocab_limit=False,  # a small corpus yields a smaller vocabulary instead of an error
                input_sentence_size=2_000_000, shuffle_input_sentence=True,  # bounds time and memory on big corpora
                minloglevel=2)
        except RuntimeError as e:  # e.g. a vocabulary smaller than the 256 byte pieces + the corpus's characters
            raise ConfigError(f"sentencepiece training with vocab_size={vocab_size} failed: {_reason(e)}") from None
        return cls(model.getvalue())

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        if not os.path.isfile(path):
            raise ConfigError(f"sentencepiece model {path} not found")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto)
        except ConfigError:
            raise ConfigError(f"{path} is not a valid sentencepiece model") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int | None:
        return _optional_id(self._sp.eos_id())

    @property
    def bos_id(self) -> int | None:
        return _optional_id(self._sp.bos_id())

    @property
    def pad_id(self) -> int | None:
        return _optional_id(self._sp.pad_id())

    def encode(self, text: str) -> np.ndarray:
        lines = self._sp.encode(text.split("\n"))
        sep = [] if self._newline_id is None else [self._newline_id]
        ids = [i for line in lines for i in line + sep]
        return np.asarray(ids[:len(ids) - len(sep)], np.int32)  # no separator after the last line

    def decode(self, ids) -> str:
        return self._sp.decode(np.asarray(ids).tolist())

    def piece(self, i: int) -> str:
        """Token i as the model stores it: "▁" where a space is part of it, "<0xF0>" for a byte-fallback piece."""
        return visible(self._sp.id_to_piece(int(i)))

    def to_json(self) -> dict:
        return {"type": "sentencepiece", "model": base64.b64encode(self._proto).decode("ascii")}

    def to_hf(self) -> "HFTokenizer":
        """The same tokenizer as a Hugging Face tokenizer.json (for export), for the models trained here (identity
        normalisation, no dummy prefix, any other normalisation has no exact equivalent here): spaces become "▁",
        words split before each "▁" as sentencepiece splits them, "\n" and the control pieces are atomic, unseen
        characters fall back to byte pieces. A BPE model's merges are ordered by the merged piece's score, the order
        in which sentencepiece merges; a unigram model keeps its pieces' scores."""
        from sentencepiece import sentencepiece_model_pb2

        m = sentencepiece_model_pb2.ModelProto()
        m.ParseFromString(self._proto)
        norm, spec = m.normalizer_spec, m.trainer_spec
        if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
            raise ConfigError(f"this sentencepiece model (normalization {norm.name!r}, dummy prefix "
                              f"{norm.add_dummy_prefix}) has no exact Hugging Face form here; only models trained "
                              "here (identity normalization) export their tokenizer")
        NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
        pieces = [(p.piece, p.score, p.type) for p in m.pieces]
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        unk = next(piece for piece, _, kind in pieces if kind == UNKNOWN)
        if spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
            normal = {piece for piece, _, kind in pieces if kind == NORMAL}
            merges = sorted((vocab[piece], vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                            for piece in normal for k in range(1, len(piece))
                            if piece[:k] in normal and piece[k:] in normal)
            model = tokenizers.models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token=unk,
                                          byte_fallback=spec.byte_fallback, fuse_unk=True)
        elif spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
            model = tokenizers.models.Unigram([(piece, score) for piece, score, _ in pieces], vocab[unk],
                                              byte_fallback=spec.byte_fallback)
        else:
            raise ConfigError("only sentencepiece BPE and unigram models export their tokenizer")
        tok = tokenizers.Tokenizer(model)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never",
                                                                split=spec.split_by_whitespace)
        tok.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.Replace("▁", " "),
                                                    tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
        tok.add_tokens([tokenizers.AddedToken(piece, special=kind == CONTROL, normalized=False)
                        for piece, _, kind in pieces if kind in (CONTROL, USER_DEFINED)])

        def named(i):
            return None if i is None else pieces[i][0]
        return HFTokenizer(tok.to_str(), bos=named(self.bos_id), eos=named(self.eos_id), pad=named(self.pad_id))


Tokenizer = CharTokenizer | SentencePieceTokenizer


def tokenizer_from_json(d: dict) -> Tokenizer:
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "char":
        return CharTokenizer(d["chars"], bool(d.get("end_of_text", False)))
    if kind == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(d["model"], validate=True))
    if kind == "huggingface":
        return HFTokenizer(d["tokenizer_json"], **{k: d[k] for k in HFTokenizer.EXTRAS if d.get(k) is not None})
    raise ConfigError(f"unknown tokenizer type {kind!r}")


TOKENIZER_FILE = "tokenizer.json"


def save_tokenizer(tok: Tokenizer, run_dir: str) -> str:
    """Write run_dir/tokenizer.json atomically (a crash mid-write never leaves a truncated file)."""
    os.makedirs(run_dir, exist_ok=True)
    return write_json_atomic(os.path.join(run_dir, TOKENIZER_FILE), tok.to_json())


def load_tokenizer(run_dir: str) -> Tokenizer:
    path = os.path.join(run_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"no tokenizer in {run_dir} ({path} not found)")
    try:
        with open(path) as f:
            return tokenizer_from_json(json.load(f))
    except (ValueError, KeyError, TypeError) as e:  # ConfigError is a ValueError; so are JSON and base64 errors
        raise ConfigError(f"{path} is corrupt ({first_line(e)})") from None


def build_tokenizer(cfg: DataConfig, train_text: str, val_text: str = "") -> Tokenizer:
    """A char alphabet covers the validation text too (it reveals only the symbol set, and an unseen val character
    would otherwise be unencodable); sentencepiece learns its pieces from the training text alone."""
    if cfg.tokenizer == "char":
        return CharTokenizer.train(train_text + val_text)
    if cfg.tokenizer == "sentencepiece":
        if cfg.tokenizer_model:
            return SentencePieceTokenizer.from_file(cfg.tokenizer_model)
        return SentencePieceTokenizer.train(train_text, cfg.vocab_size, cfg.sp_model_type)
    if cfg.tokenizer == "bpe":
        return HFTokenizer.train_byte_level(train_text, cfg.vocab_size)
    raise ConfigError(f"unknown data.tokenizer={cfg.tokenizer!r}; use 'char', 'sentencepiece' or 'bpe'")


def _optional_id(i: int) -> int | None:
    return None if i < 0 else i  # sentencepiece reports a disabled special piece as -1


def _reason(e: Exception) -> str:
    # Drop sentencepiece's "INTERNAL: src/file.cc(123) [check]" prefix and keep the human-readable part.
    line = first_line(e)
    return line.rsplit("] ", 1)[-1].strip() or line


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (WordPiece for BERT, byte-level BPE for GPT-2 / Llama / Qwen) run by the
    `tokenizers` package, held as the JSON text so it round-trips through `to_json` like the others, with what
    tokenizer_config.json adds: the bos / eos / pad tokens, the chat template, and the ids that end a reply.

    `encode` adds the special tokens the file's post-processor adds ([CLS] text [SEP] for BERT, <s> for Llama) and
    never pads or truncates: the padding / truncation settings stored in the file are for batched HF pipelines, and
    callers here pad and check lengths themselves. Without explicit bos / eos tokens, [CLS] / [SEP] (<s> / </s>)
    play those parts, as they open and close every BERT sequence.
    """

    SPECIALS = {"cls": ("[CLS]", "<s>"), "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>"),
                "pad": ("[PAD]", "<pad>")}
    EXTRAS = ("bos", "eos", "pad", "chat_template", "stop_ids")

    def __init__(self, tokenizer_json: str, *, bos: str | None = None, eos: str | None = None,
                 pad: str | None = None, chat_template: str | None = None, stop_ids=()):
        self._json = tokenizer_json
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the tokenizers package raises a bare Exception for unparsable files
            raise ConfigError(f"not a valid Hugging Face tokenizer.json ({first_line(e)})") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self.bos, self.eos, self.pad = bos, eos, pad
        self.chat_template = chat_template
        self._stop_ids = [int(i) for i in stop_ids]
        for kind, token in (("bos", bos), ("eos", eos), ("pad", pad)):
            if token is not None and self._tok.token_to_id(token) is None:
                raise ConfigError(f"the {kind} token {token!r} is not in the vocabulary")

    @classmethod
    def train_byte_level(cls, text: str, vocab_size: int) -> "HFTokenizer":
        """A byte-level BPE (GPT-2's kind: every byte string encodes, no unknown token) learned from `text`, with
        <|endoftext|> as its eos."""
        eos = "<|endoftext|>"
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                                 initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        lines = text.splitlines(keepends=True)
        tok.train_from_iterator(("".join(lines[k:k + 1000]) for k in range(0, len(lines), 1000)), trainer)
        return cls(tok.to_str(), eos=eos)

    @classmethod
    def from_file(cls, path: str) -> "HFTokenizer":
        if not os.path.isfile(path):
            raise ConfigError(f"Hugging Face tokenizer {path} not found")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            return cls(text)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @property
    def tokenizer_json(self) -> str:
        return self._json

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special(self, kind: str) -> int | None:
        return next((i for i in map(self._tok.token_to_id, self.SPECIALS[kind]) if i is not None), None)

    @property
    def cls_id(self) -> int | None:
        return self._special("cls")

    @property
    def sep_id(self) -> int | None:
        return self._special("sep")

    @property
    def mask_id(self) -> int | None:
        return self._special("mask")

    @property
    def pad_id(self) -> int | None:
        return self._tok.token_to_id(self.pad) if self.pad is not None else self._special("pad")

    @property
    def bos_id(self) -> int | None:
        return self._tok.token_to_id(self.bos) if self.bos is not None else self.cls_id

    @property
    def eos_id(self) -> int | None:
        return self._tok.token_to_id(self.eos) if self.eos is not None else self.sep_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a reply: the eos token and any other the model's generation config names."""
        ids = ([self.eos_id] if self.eos_id is not None else []) + self._stop_ids
        return sorted(set(ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]:
        """`encode` of each text, in one call into the tokenizers library (no Python per document)."""
        encodings = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens)

    def piece(self, i: int) -> str:
        """Token i as it reads: a byte-level BPE token as its text with whitespace drawn, or as its bytes
        ("<0xF0><0x9F>") when it holds only part of a UTF-8 character (an emoji spans several tokens); other
        vocabularies as stored ("##ing" for WordPiece, "▁" and "<0x0A>" for sentencepiece-style ones)."""
        token = self._tok.id_to_token(int(i))
        if token is None:
            raise ConfigError(f"token id {i} is not in the vocabulary of {self.vocab_size}")
        if not self._byte_level or not all(c in BYTE_LEVEL for c in token):  # added tokens are stored as text
            return visible(token)
        text = bytes(BYTE_LEVEL[c] for c in token).decode("utf-8", "surrogateescape")  # bad bytes -> U+DC80..
        return "".join(hex_bytes(bytes([ord(c) - 0xDC00])) if 0xDC80 <= ord(c) <= 0xDCFF else visible(c) for c in text)

    @functools.cached_property
    def _byte_level(self) -> bool:
        decoder = json.loads(self._json).get("decoder") or {}
        parts = decoder.get("decoders") or [decoder]
        return any(d.get("type") == "ByteLevel" for d in parts)

    def to_json(self) -> dict:
        extras = {"bos": self.bos, "eos": self.eos, "pad": self.pad, "chat_template": self.chat_template,
                  "stop_ids": self._stop_ids}
        return {"type": "huggingface", "tokenizer_json": self._json, **{k: v for k, v in extras.items() if v}}

    def tokenizer_config(self) -> dict:
        """tokenizer_config.json for an exported directory."""
        out = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for kind in ("bos", "eos", "pad"):
            if getattr(self, kind) is not None:
                out[f"{kind}_token"] = getattr(self, kind)
        if self.chat_template:
            out["chat_template"] = self.chat_template
        return out


Tokenizer = CharTokenizer | SentencePieceTokenizer | HFTokenizer  # noqa: F811  (extends the union above)
