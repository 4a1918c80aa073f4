"""CLIP's byte-level BPE tokenizer, written here: text -> token ids ``(B, context_length)`` int32.

It reproduces the Hugging Face CLIP tokenizer (``tokenizer.json`` of ``openai/clip-vit-base-patch32``):

1. normalise: NFC, every run of whitespace -> one space, lowercase (character by character);
2. pre-tokenise: keep only the matches of
   ``<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   (so digits are single tokens, a run of punctuation is one word), then map each word's UTF-8 bytes to
   GPT-2's printable characters (``bytes_to_unicode``);
3. BPE: the last symbol of each word carries ``</w>``, merges are applied by rank; a symbol missing from the
   vocabulary becomes the unknown token ``<|endoftext|>``;
4. ``__call__`` adds ``<|startoftext|>`` ... ``<|endoftext|>`` and pads to ``context_length``.

It is the project's own (standard library and numpy only, no ``tokenizers``/``regex``/``ftfy``) so that the
CLIP text tower works offline from a checkpoint directory with no extra run-time dependency; the tests check
it id for id against the ``tokenizers`` package. ``\\p{L}``/``\\p{N}`` are ``unicodedata.category`` starting
with ``L``/``N``, and ``\\s`` is Oniguruma's (HF's regex engine): U+0009..U+000D, U+0085 and the categories
Zs/Zl/Zp (Python's ``str.isspace`` also takes U+001C..U+001F, which HF does not).

Where it deliberately differs from HF's ``CLIPTokenizerFast``:

- ``ftfy.fix_text`` and ``html.unescape`` (the original OpenAI ``basic_clean``) are not applied; HF's
  ``tokenizer.json`` pipeline does not apply them either.
- The literal strings ``<|startoftext|>``/``<|endoftext|>`` inside a text are tokenised as ordinary text (as
  the pre-tokeniser pipeline alone does), not mapped to the special ids as HF's added-token matching does, so
  a prompt cannot inject an end of text: the eos position (CLIP's pooled token) is always the real end.
- Character data (categories, case, NFC) are Python's ``unicodedata`` (Unicode 14.0 on Python 3.11); HF uses
  its Rust crates' tables, so characters assigned or changed in later Unicode versions can differ.
"""
from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import cache

import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# The contractions of the pattern, tried in its order right after an apostrophe.
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
_SPACE, _LETTER, _NUMBER, _OTHER = 0, 1, 2, 3
# Oniguruma's Unicode \s outside the Z categories.
_SPACE_CONTROLS = frozenset("\t\n\x0b\x0c\r\x85")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's map of the 256 byte values to printable characters (printable Latin-1 bytes map to themselves,
  the others to ``chr(256 + k)``), so that BPE works on strings with no whitespace or control characters."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


@cache
def _char_class(c: str) -> int:
  """Class of one character for the pre-tokeniser: space (Oniguruma ``\\s``), letter, number or other."""
  if c in _SPACE_CONTROLS:
    return _SPACE
  cat = unicodedata.category(c)
  if cat[0] == "Z":
    return _SPACE
  if cat[0] == "L":
    return _LETTER
  if cat[0] == "N":
    return _NUMBER
  return _OTHER


def normalize(text: str) -> str:
  """HF CLIP's normaliser: NFC, each run of whitespace -> one space, lowercase char by char (Rust's
  ``char::to_lowercase``: no final-sigma rule, unlike ``str.lower`` on a whole string)."""
  text = unicodedata.normalize("NFC", text)
  out = []
  in_space = False
  for c in text:
    if _char_class(c) == _SPACE:
      if not in_space:
        out.append(" ")
      in_space = True
    else:
      out.append(c.lower())
      in_space = False
  return "".join(out)


def pre_tokenize(text: str) -> list[str]:
  """Words of an already normalised text: the matches of CLIP's pattern, left to right, alternatives tried in
  the pattern's order (a leftmost-first regex engine's result); the text between matches (whitespace) is
  dropped."""
  words = []
  i, n = 0, len(text)
  while i < n:
    c = text[i]
    if c == "<":
      special = next((t for t in (BOS_TOKEN, EOS_TOKEN) if text.startswith(t, i)), None)
      if special is not None:
        words.append(special)
        i += len(special)
        continue
    elif c == "'":
      suffix = next((s for s in _CONTRACTIONS if text.startswith(s, i + 1)), None)
      if suffix is not None:
        words.append(c + suffix)
        i += 1 + len(suffix)
        continue
    kind = _char_class(c)
    if kind == _SPACE:
      i += 1
      continue
    j = i + 1
    if kind != _NUMBER:  # letters and others run greedily; a number is one character
      while j < n and _char_class(text[j]) == kind:
        j += 1
    words.append(text[i:j])
    i = j
  return words


def _to_byte_chars(word: str) -> str:
  """The word's UTF-8 bytes as ``bytes_to_unicode`` characters."""
  # A latin-1 view of the bytes has one character per byte, so one str.translate maps them all.
  return word.encode("utf-8").decode("latin-1").translate(_BYTE_ENCODER)


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
  """``symbols`` with every occurrence of ``pair`` merged, left to right without overlap."""
  first, second = pair
  out = []
  i, n = 0, len(symbols)
  while i < n:
    if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
      out.append(first + second)
      i += 2
    else:
      out.append(symbols[i])
      i += 1
  return out


def _word_symbols(byte_word: str) -> list[str]:
  """Initial BPE symbols of a byte-mapped word: its characters, the last with ``</w>``."""
  symbols = list(byte_word)
  symbols[-1] += END_OF_WORD
  return symbols


class CLIPTokenizer:
  """CLIP's tokenizer on a given vocabulary and merge list (see the module docstring).

  ``tok(texts)`` -> ``(len(texts), context_length)`` int32 ids: ``[bos] + ids[:context_length - 2] + [eos]``
  then ``pad_id``. ``bos_id``, ``eos_id``, ``pad_id``, ``context_length``, ``vocab_size`` are attributes.
  """

  _CACHE_SIZE = 1 << 16  # words whose BPE is kept; cleared when full (prompts reuse a small vocabulary)

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], context_length: int = 77,
               pad_token: str = EOS_TOKEN, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN):
    if context_length < 2:
      raise ValueError(f"context_length must be at least 2 (bos and eos), got {context_length}")
    for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
      if token not in vocab:
        raise ValueError(f"the {name} token {token!r} is not in the vocabulary ({len(vocab)} tokens)")
    self.vocab = dict(vocab)
    self.id_to_token = {i: t for t, i in self.vocab.items()}
    self.merges = [tuple(pair) for pair in merges]
    self.ranks = {pair: rank for rank, pair in reversed(list(enumerate(self.merges)))}  # first rank wins
    self.context_length = int(context_length)
    self.bos_id = self.vocab[bos_token]
    self.eos_id = self.vocab[eos_token]
    self.pad_id = self.vocab[pad_token]
    self.unk_id = self.vocab[EOS_TOKEN] if EOS_TOKEN in self.vocab else self.eos_id
    self.vocab_size = len(self.vocab)
    self._cache: dict[str, tuple[int, ...]] = {}

  @classmethod
  def from_directory(cls, path: str | os.PathLike, context_length: int) -> CLIPTokenizer:
    """Reads a Hugging Face CLIP tokenizer directory: ``vocab.json`` + ``merges.txt``, or else
    ``tokenizer.json``; the pad token from ``special_tokens_map.json`` or ``tokenizer_config.json``."""
    path = os.fspath(path)
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
      source = vocab_file
      vocab = _read_json(vocab_file)
      if not _is_vocab(vocab):
        raise ValueError(f"{vocab_file} is not a CLIP vocabulary (a JSON object of token: id); {_REDO}")
      try:
        with open(merges_file, encoding="utf-8") as f:
          # "#version" headers read as blank lines, so that the numbers in messages are the file's lines.
          lines = ("" if line.startswith("#version") else line for line in f)
          merges = _parse_merges(lines, lambda n: f"line {n} of {merges_file}")
      except UnicodeDecodeError as e:
        raise ValueError(f"{merges_file} is not UTF-8 text ({e}); {_REDO}") from None
    elif os.path.isfile(tokenizer_file):
      source = tokenizer_file
      spec = _read_json(tokenizer_file)
      model = spec.get("model") if isinstance(spec, dict) else None
      vocab = model.get("vocab") if isinstance(model, dict) else None
      merges = model.get("merges") if isinstance(model, dict) else None
      added = (spec.get("added_tokens") if isinstance(spec, dict) else None) or []
      if not _is_vocab(vocab) or not isinstance(merges, list) or not isinstance(added, list):
        raise ValueError(f"{tokenizer_file} is not a BPE tokenizer: it needs model.vocab (token: id) and model.merges "
                         f"(a list); {_REDO}")
      vocab = dict(vocab)
      for entry in added:  # specials may live only here
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str) and _is_id(entry.get("id"))):
          raise ValueError(f"{tokenizer_file}: added_tokens holds {entry!r}, not {{content, id}}; {_REDO}")
        vocab.setdefault(entry["content"], entry["id"])
      merges = _parse_merges(merges, lambda n: f"model.merges[{n}] of {tokenizer_file}", first=0)
    else:
      raise ValueError(f"no CLIP tokenizer in {path!r}: looked for vocab.json + merges.txt, or tokenizer.json")
    pad_token = _special_token(path, "pad_token") or EOS_TOKEN
    for name, token in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", pad_token)):
      if token not in vocab:  # here, where the file is known (the constructor's message cannot name it)
        raise ValueError(f"{source} has no {name} token {token!r} among its {len(vocab)} tokens; {_REDO}")
    return cls(vocab, merges, context_length=context_length, pad_token=pad_token)

  def _bpe(self, word: str) -> tuple[int, ...]:
    """Ids of one pre-tokenised word (cached)."""
    ids = self._cache.get(word)
    if ids is not None:
      return ids
    symbols = _word_symbols(_to_byte_chars(word))
    ranks = self.ranks
    while len(symbols) > 1:
      # The pair of lowest rank; merging all its occurrences at once equals HF's one-at-a-time merging for
      # merges learned in order (a merge's parts are created by earlier merges).
      pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
      if pair not in ranks:
        break
      symbols = _merge_pair(symbols, pair)
    ids = tuple(self.vocab.get(s, self.unk_id) for s in symbols)
    if len(self._cache) >= self._CACHE_SIZE:
      self._cache.clear()
    self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """BPE ids of ``text``, without bos/eos."""
    return [i for word in pre_tokenize(normalize(text)) for i in self._bpe(word)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids``: bos/eos/pad dropped, each ``</w>`` a space, bytes decoded as UTF-8 (invalid sequences
    replaced), stripped."""
    drop = {self.bos_id, self.eos_id, self.pad_id}
    out = bytearray()
    for i in ids:
      i = int(i)
      if i in drop:
        continue
      token = self.id_to_token.get(i)
      if token is None:
        raise ValueError(f"token id {i} is not in the vocabulary ({self.vocab_size} tokens)")
      end = token.endswith(END_OF_WORD)
      out += bytes(_BYTE_DECODER[c] for c in (token[: -len(END_OF_WORD)] if end else token))
      if end:
        out += b" "
    return out.decode("utf-8", errors="replace").strip()

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """``texts`` (B strings) -> ``(B, context_length)`` int32: bos, the first ``context_length - 2`` ids,
    eos, then ``pad_id``."""
    if isinstance(texts, (str, bytes)):
      raise TypeError("CLIPTokenizer takes a list of strings, not a single string: pass [text]")
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = self.encode(text)[: self.context_length - 2]
      out[row, 0] = self.bos_id
      out[row, 1 : len(ids) + 1] = ids
      out[row, len(ids) + 1] = self.eos_id
    return out


_REDO = "download the tokenizer files again or save them with save_vocab"


def _is_id(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_vocab(vocab) -> bool:
  """Whether ``vocab`` is a token -> id mapping as ``vocab.json`` and ``tokenizer.json`` hold it."""
  return isinstance(vocab, dict) and all(isinstance(t, str) and _is_id(i) for t, i in vocab.items())


def _read_json(file: str):
  """A tokenizer file's JSON; a damaged file is a ValueError that names it."""
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise ValueError(f"{file} is not valid JSON ({e}); {_REDO}") from None


def _parse_merges(entries: Iterable[str | Sequence[str]], where: Callable[[int], str] = "merge {}".format,
                  first: int = 1) -> list[tuple[str, str]]:
  """Merges from ``"a b"`` lines/strings or ``[a, b]`` pairs; blank lines skipped. ``where(number)`` names an
  entry in messages, numbered from ``first``."""
  merges = []
  for number, entry in enumerate(entries, first):
    parts = entry.split() if isinstance(entry, str) else list(entry) if isinstance(entry, (list, tuple)) else None
    if parts == []:
      continue
    if parts is None or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
      raise ValueError(f"{where(number)} is {entry!r}, not a merge of two tokens; {_REDO}")
    merges.append((parts[0], parts[1]))
  return merges


def _special_token(path: str, key: str) -> str | None:
  """``key``'s token from ``special_tokens_map.json``, else ``tokenizer_config.json`` (a str or a dict with
  ``content``); None when neither names it."""
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      continue
    spec = _read_json(file)
    value = spec.get(key) if isinstance(spec, dict) else None
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str):
      return value
  return None


def train_bpe(corpus: Sequence[str], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Learns up to ``num_merges`` BPE merges on ``corpus`` (words as ``encode`` makes them): each step merges the
  most frequent adjacent pair (ties: the smallest pair), until no pair is left.

  Vocab laid out like CLIP's: ids 0..255 the byte characters in ``bytes_to_unicode`` order, 256..511 the same
  with ``</w>``, then one token per merge in merge order (a merge whose result is already a token adds none),
  then ``<|startoftext|>``, ``<|endoftext|>``.
  """
  byte_chars = list(bytes_to_unicode().values())
  tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
  seen = set(tokens)
  counts = Counter(_to_byte_chars(w) for text in corpus for w in pre_tokenize(normalize(text)))
  words = [(_word_symbols(w), n) for w, n in counts.items()]
  merges: list[tuple[str, str]] = []
  while len(merges) < num_merges:
    pairs: Counter[tuple[str, str]] = Counter()
    for symbols, n in words:
      for pair in zip(symbols, symbols[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    merged = best[0] + best[1]
    if merged not in seen:
      seen.add(merged)
      tokens.append(merged)
    words = [(_merge_pair(symbols, best) if len(symbols) > 1 else symbols, n) for symbols, n in words]
  tokens += [BOS_TOKEN, EOS_TOKEN]
  return {t: i for i, t in enumerate(tokens)}, merges


def save_vocab(directory: str | os.PathLike, vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> None:
  """Writes ``vocab.json`` and ``merges.txt`` (``#version: 0.2`` header, one ``a b`` per line) as HF does."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)
