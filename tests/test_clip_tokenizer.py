"""The project's CLIP tokenizer against an independent oracle: Hugging Face ``tokenizers`` built with CLIP's exact
pipeline (``tokenizer.json`` of openai/clip-vit-base-patch32) on the same vocabulary and merges."""
from __future__ import annotations

import json
import random
import re
import unicodedata

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from videofusion_jax.models.clip_tokenizer import CLIPTokenizer, bytes_to_unicode, save_vocab, train_bpe

PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

CORPUS = [
  "a photo of a cat", "a photo of a dog", "a photo of the beach at sunset", "the dog is running on the beach",
  "it's a sunny day and they'll go outside", "a video of a person playing the guitar", "café crème brûlée",
  "日本語のテキスト", "straße in münchen", "2023 was a good year", "a cat, a dog... and a bird!!",
  "people walking through a crowded street at night", "a timelapse of clouds moving over the mountains",
  "a close-up of raindrops falling into a puddle", "children playing football in the park",
  "waves crashing against the rocks", "a chef cooking pasta in a kitchen", "a train passing through the countryside",
  "fireworks exploding over the city", "a horse galloping across a field", "snow falling on pine trees",
] * 3
NUM_MERGES = 200  # fewer than the corpus allows (265), so rarer words stay split into several tokens

TEXTS = [
  "a photo of a cat",
  "A Photo Of The BEACH at Sunset",
  "it's raining; THEY'LL stay, we're fine, I'm here, you've won, he'd go, can't",
  "the year 2023 and 1999",
  "wow!!! ... ?!?! (hello) [world] {x} <tag> #hashtag @user $5.00 100%",
  "multiple   spaces\tand\ttabs\nand\nnewlines\r\n\r\nend",
  "  leading and trailing  ",
  "café crème brûlée naïve résumé",
  "e\u0301cole vs école (combining vs precomposed)",
  "日本語のテキスト 中文 한국어",
  "emoji 😀🎉👍🏽 and 👨‍👩‍👧 family",
  "x² + y² = z², ½ cup, ③, ⅷ",
  "العربية نص",
  "ΟΔΟΣ ΣΟΦΟΣ σοφός",
  "İstanbul ǅemal Straße",
  "MiXeD CaSe WoRdS",
  "a<|endoftext|>b <|startoftext|> !<|endoftext|>",
  "'s 's 'S 'x '' 'reindeer 'll",
  "tab\x0bvertical\x0cform\x1cfile\x1dgroup\x85nel\xa0nbsp\u2028line\u3000ideographic\u180emongolian",
  "zero\u200bwidth joiner\u200d",
  "",
  "   ",
  "ﬁne ligature ﬀ",
  "hindi हिन्दी text",
  "thai ภาษาไทย",
  "numbers ١٢٣ ४५६",
  "a photo of a dog on the beach, running; it's sunny.",
  "unicode ℕ ℝ ∑ ∞ ≠ → ⇒",
  "'hello' \"quoted\" `backtick`",
  "a-b_c/d\\e|f~g",
]


def _pipeline(tok: Tokenizer) -> Tokenizer:
  """CLIP's normaliser and pre-tokeniser, as in its ``tokenizer.json``."""
  tok.normalizer = normalizers.Sequence(
    [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  return tok


def _oracle(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
  return _pipeline(Tokenizer(models.BPE(vocab, merges, unk_token=EOS, end_of_word_suffix="</w>",
                                        continuing_subword_prefix="")))


@pytest.fixture(scope="module")
def trained():
  return train_bpe(CORPUS, NUM_MERGES)


@pytest.fixture(scope="module")
def ours(trained):
  return CLIPTokenizer(*trained, context_length=16)


@pytest.fixture(scope="module")
def oracle(trained):
  return _oracle(*trained)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_hf_tokenizers(ours, oracle, text):
  assert ours.encode(text) == oracle.encode(text, add_special_tokens=False).ids


def test_ids_match_hf_tokenizers_on_sampled_code_points(ours, oracle):
  # Every character class (space / letter / number / other), its lowercase and its NFC, tried in a context where
  # each class splits differently: "a" + c + "1" + c + c + "!" + "A" + c. Characters unassigned in Python's
  # Unicode data are left out (HF's tables may be of a later Unicode version).
  rng = random.Random(0)
  assigned = [cp for cp in range(0x110000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
  sample = [*range(0x250), 0x85, 0xa0, 0x180e, 0x2000, 0x200a, 0x2028, 0x2029, 0x202f, 0x205f, 0x3000, 0x1c, 0x1f,
            0x130, 0x3a3, 0x1e9e, 0xb2, 0xbd, 0x2167, 0x1d7d8, *rng.sample(assigned, 3000)]
  texts = ["a" + chr(cp) + "1" + chr(cp) + chr(cp) + "!" + "A" + chr(cp) for cp in sample]
  expected = [e.ids for e in oracle.encode_batch(texts, add_special_tokens=False)]
  mismatched = [hex(cp) for cp, text, ids in zip(sample, texts, expected) if ours.encode(text) != ids]
  assert mismatched == []


def test_superscripts_and_fractions_are_single_numbers(ours, oracle):
  # ² and ½ are category No, so \p{N}: each is a word of its own, like a digit.
  words = [w for w, _ in oracle.pre_tokenizer.pre_tokenize_str("x²½12")]
  assert len(words) == 5
  assert ours.encode("x²½12") == oracle.encode("x²½12", add_special_tokens=False).ids


def test_unknown_symbol_is_the_unk_token():
  # A vocabulary without "q": HF's BPE gives the unk token (<|endoftext|>) for each missing symbol.
  chars = [c for c in bytes_to_unicode().values() if c != "q"]
  vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + [BOS, EOS])}
  ours = CLIPTokenizer(vocab, [])
  for text in ["quiz", "a q b", "qq"]:
    assert ours.encode(text) == _oracle(vocab, []).encode(text, add_special_tokens=False).ids
  assert ours.encode("qq") == [vocab[EOS], vocab[EOS]]


def test_literal_special_strings_are_plain_text(ours, oracle):
  # Ours does not map "<|endoftext|>" in a prompt to the eos id (the oracle has no added tokens either).
  ids = ours.encode("a <|endoftext|> b")
  assert ids == oracle.encode("a <|endoftext|> b", add_special_tokens=False).ids
  assert ours.eos_id not in ids and ours.bos_id not in ids


def test_round_trip(ours, oracle):
  # Words separated by whitespace come back lowercased, joined by single spaces.
  assert ours.decode(ours.encode("A  Photo\tOf\n\nthe CAFÉ  日本語 😀🎉 !!! ")) == "a photo of the café 日本語 😀🎉 !!!"
  # In general the text comes back as HF's normalised pre-tokens joined by single spaces ("it's" -> "it 's").
  for text in TEXTS:
    words = [w for w, _ in oracle.pre_tokenizer.pre_tokenize_str(oracle.normalizer.normalize_str(text))]
    expected = " ".join(bytes(_byte_decoder()[c] for c in w).decode("utf-8") for w in words)
    assert ours.decode(ours.encode(text)) == expected, text
  assert ours.decode(ours.encode("it's 2023!")) == "it 's 2 0 2 3 !"


def _byte_decoder() -> dict[str, int]:
  return {c: b for b, c in bytes_to_unicode().items()}


def test_decode_drops_specials_and_rejects_unknown_ids(ours):
  ids = ours(["a photo"])[0]
  assert ours.decode(ids) == "a photo"
  with pytest.raises(ValueError, match="not in the vocabulary"):
    ours.decode([ours.vocab_size + 10])


def test_call_layout(ours):
  texts = ["a photo of a cat", "", "dog"]
  out = ours(texts)
  assert out.shape == (3, 16) and out.dtype == np.int32
  for row, text in zip(out, texts):
    ids = ours.encode(text)
    n = len(ids)
    assert row[0] == ours.bos_id
    np.testing.assert_array_equal(row[1 : n + 1], ids)
    assert row[n + 1] == ours.eos_id
    np.testing.assert_array_equal(row[n + 2 :], np.full(16 - n - 2, ours.pad_id))
    # CLIP's legacy pooling: eos is the largest id, so argmax (first maximum) finds it, the first eos too.
    assert int(np.argmax(row)) == n + 1 == int(np.flatnonzero(row == ours.eos_id)[0])


def test_call_truncates_long_text(ours):
  text = " ".join(["a photo of a cat"] * 20)
  ids = ours.encode(text)
  assert len(ids) > 16
  row = ours([text])[0]
  assert row[0] == ours.bos_id and row[-1] == ours.eos_id
  np.testing.assert_array_equal(row[1:-1], ids[:14])
  assert int(np.argmax(row)) == 15


def test_call_with_pad_other_than_eos(trained):
  tok = CLIPTokenizer(*trained, context_length=12, pad_token="!")
  assert tok.pad_id == trained[0]["!"] != tok.eos_id
  row = tok(["a cat"])[0]
  n = len(tok.encode("a cat"))
  assert int(np.flatnonzero(row == tok.eos_id)[0]) == n + 1
  np.testing.assert_array_equal(row[n + 2 :], np.full(12 - n - 2, tok.pad_id))
  assert tok.decode(row) == "a cat"


def test_call_rejects_a_bare_string(ours):
  with pytest.raises(TypeError, match=r"pass \[text\]"):
    ours("a photo of a cat")


def test_from_directory_layouts(tmp_path, trained, oracle):
  vocab, merges = trained
  save_vocab(tmp_path / "txt", vocab, merges)
  assert (tmp_path / "txt" / "merges.txt").read_text(encoding="utf-8").splitlines()[0] == "#version: 0.2"
  # HF reads the files save_vocab wrote.
  hf_from_files = _pipeline(Tokenizer(models.BPE.from_file(
    str(tmp_path / "txt" / "vocab.json"), str(tmp_path / "txt" / "merges.txt"), unk_token=EOS,
    end_of_word_suffix="</w>", continuing_subword_prefix="")))
  # tokenizer.json as HF writes it, and with the merges rewritten both as "a b" strings and as [a, b] pairs.
  (tmp_path / "hf").mkdir()
  oracle.save(str(tmp_path / "hf" / "tokenizer.json"))
  spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8"))
  for name, form in (("strings", lambda a, b: f"{a} {b}"), ("pairs", lambda a, b: [a, b])):
    (tmp_path / name).mkdir()
    spec["model"]["merges"] = [form(a, b) for a, b in merges]
    (tmp_path / name / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
  loaded = {name: CLIPTokenizer.from_directory(tmp_path / name, 16) for name in ("txt", "hf", "strings", "pairs")}
  text = " ".join(TEXTS)
  expected = oracle.encode(text, add_special_tokens=False).ids
  assert hf_from_files.encode(text, add_special_tokens=False).ids == expected
  for name, tok in loaded.items():
    assert tok.encode(text) == expected, name
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (vocab[BOS], vocab[EOS], vocab[EOS], len(vocab))
    np.testing.assert_array_equal(tok(TEXTS), loaded["txt"](TEXTS))


def test_from_directory_reads_the_pad_token(tmp_path, trained):
  vocab, merges = trained
  for name, file, value in (("map", "special_tokens_map.json", {"content": "!", "lstrip": False}),
                            ("config", "tokenizer_config.json", "!")):
    save_vocab(tmp_path / name, vocab, merges)
    (tmp_path / name / file).write_text(json.dumps({"pad_token": value}), encoding="utf-8")
    assert CLIPTokenizer.from_directory(tmp_path / name, 16).pad_id == vocab["!"]


def test_from_directory_without_tokenizer_files(tmp_path, trained):
  (tmp_path / "empty").mkdir()
  (tmp_path / "only_vocab").mkdir()
  (tmp_path / "only_vocab" / "vocab.json").write_text(json.dumps(trained[0]), encoding="utf-8")
  for d in (tmp_path / "empty", tmp_path / "only_vocab", tmp_path / "missing"):
    with pytest.raises(ValueError) as err:
      CLIPTokenizer.from_directory(d, 77)
    assert str(err.value) == (f"no CLIP tokenizer in {str(d)!r}: looked for vocab.json + merges.txt, "
                              "or tokenizer.json")


def test_bytes_to_unicode():
  table = bytes_to_unicode()
  assert list(table) == [*range(33, 127), *range(161, 173), *range(174, 256), *range(0, 33), *range(127, 161), 173]
  assert all(table[b] == chr(b) for b in [*range(33, 127), *range(161, 173), *range(174, 256)])
  assert [table[b] for b in [*range(0, 33), *range(127, 161), 173]] == [chr(256 + k) for k in range(68)]
  assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_train_bpe_vocab_layout(trained):
  vocab, merges = trained
  chars = list(bytes_to_unicode().values())
  tokens = sorted(vocab, key=vocab.get)
  assert sorted(vocab.values()) == list(range(len(vocab)))
  assert tokens[:256] == chars
  assert tokens[256:512] == [c + "</w>" for c in chars]
  # No two merges of this corpus give the same token, so each adds one.
  assert len(merges) == NUM_MERGES and len(vocab) == 512 + NUM_MERGES + 2
  assert tokens[512:-2] == [a + b for a, b in merges]
  assert tokens[-2:] == [BOS, EOS]


def test_train_bpe_frequent_words_become_single_tokens(ours, oracle):
  for word in ["photo", "cat", "dog", "beach", "the"]:
    assert ours.encode(word) == [ours.vocab[word + "</w>"]]
    assert oracle.encode(word, add_special_tokens=False).ids == [ours.vocab[word + "</w>"]]


def test_train_bpe_by_hand():
  # "ab" x3 and "abc": (a, b</w>) occurs 3 times; then (a, b) and (b, c</w>) once each, the smaller pair first.
  vocab, merges = train_bpe(["ab ab ab abc"], 10)
  assert merges == [("a", "b</w>"), ("a", "b"), ("ab", "c</w>")]
  assert [vocab["ab</w>"], vocab["ab"], vocab["abc</w>"]] == [512, 513, 514]
  assert (vocab[BOS], vocab[EOS], len(vocab)) == (515, 516, 517)


def test_a_bad_merge_is_named_by_its_line_and_file(tmp_path, trained):
  """A damaged merges.txt line is reported with the file and the line number a text editor shows (the
  #version header counted), and a damaged merge in tokenizer.json by its index in model.merges."""
  vocab, merges = trained
  save_vocab(tmp_path / "txt", vocab, merges)
  lines = (tmp_path / "txt" / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
  lines.insert(5, "x y z\n")  # the file's line 6
  (tmp_path / "txt" / "merges.txt").write_text("".join(lines), encoding="utf-8")
  file = tmp_path / "txt" / "merges.txt"
  with pytest.raises(ValueError, match="^" + re.escape(f"line 6 of {file} is 'x y z\\n', not a merge of two tokens")):
    CLIPTokenizer.from_directory(tmp_path / "txt", 16)
  (tmp_path / "hf").mkdir()
  spec = {"model": {"vocab": vocab, "merges": [f"{a} {b}" for a, b in merges[:3]] + [["x"]]}}
  (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
  file = tmp_path / "hf" / "tokenizer.json"
  with pytest.raises(ValueError, match="^" + re.escape(f"model.merges[3] of {file} is ['x'], not a merge")):
    CLIPTokenizer.from_directory(tmp_path / "hf", 16)
