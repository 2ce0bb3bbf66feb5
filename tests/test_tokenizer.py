"""Tests of sd_tf.tokenizer.CLIPTokenizer against OpenAI's and transformers' CLIP tokenizers."""

import html
import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sd_tf.tokenizer import END_TOKEN_ID, MAX_LENGTH, START_TOKEN_ID, VOCAB_SIZE, CLIPTokenizer
from sd_tf.tokenizer import clip_tokenizer

CLIP_WHEEL = "clip-anytorch==2.6.0"
PROMPTS_FILE = Path(__file__).with_name("tokenizer_prompts.txt")

# Prompts that cannot be written as plain lines of PROMPTS_FILE: odd whitespace,
# control characters, and mojibake holding C1 control characters.
ESCAPED_PROMPTS = [
    "",
    "   ",
    "\t\n",
    "a photo\tof a cat",
    "line one\nline two\r\nline three",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space\u3000between",
    "line\u2028separator and\u2029paragraph",
    "vertical\x0btab and form\x0cfeed",
    "zero\u200bwidth\u200bspace",
    "soft\u00adhyphen",
    "  leading and trailing   spaces  ",
    "many     spaces\t\t\tand tabs",
    "\x1b[31mred terminal text\x1b[0m",
    "null\x00byte and bell\x07",
    "â€œquotedâ€\x9d text",
    "Ð¼Ð¾Ñ\x81ÐºÐ²Ð°",
    "æ\x9d±äº¬ tokyo",
    "e\u0301 decomposed e-acute, cafe\u0301",
    "&amp;\t&lt;3\n&#39;s",
]

# Pieces that generated prompts are made of, mixing every kind the hand-written prompts have.
PIECES = [
    "a photo of an astronaut", "portrait of a woman", "cyberpunk city", "oil painting", "by Greg Rutkowski",
    "trending on ArtStation", "highly detailed", "8k", "4K UHD", "octane render", "studio lighting",
    "(masterpiece:1.2)", "((best quality))", "[blurry]", "(detailed eyes:0.8)", "{highres}", "(((1girl)))",
    "<lora:add_detail:0.5>", "[cat:dog:0.5]", "(red:1.1) AND (blue:0.9)",
    "café", "naïve", "Zürich", "São Paulo", "crème brûlée", "İstanbul", "Straße", "Ελληνικά", "Москва",
    "東京の夜景", "赛博朋克", "한국어", "ＡＩ ａｒｔ", "ﾃｽﾄ", "ﬁne ﬂowers", "ǅ",
    "🎨", "🐱", "👩🏽‍🚀", "❤️", "🇯🇵", "✨✨", "🔥🔥🔥", "¯\\_(ツ)_/¯",
    "&amp;", "&lt;3", "&#39;", "&quot;hi&quot;", "&amp;amp;", "&nbsp;", "&eacute;", "&#x1F600;",
    "&amp;lt;b&amp;gt;", "<b>", "</i>", "<3",
    "cafÃ©", "naÃ¯ve", "Ã¼ber", "donâ€™t", "SchÃ¶ne GrÃ¼ÃŸe", "â€”", "ðŸ˜€", "â€œquotedâ€\x9d",
    "“curly”", "it’s", "‘single’",
    "!!!", "...", "?!?!", "--", "~~~", "***", ",,", "///", "@#$%^&*", "«»", "—", "…", "#art",
    "1920s", "4k", "3.14159", "2024-01-13", "1,000,000", "½", "²", "٣", "Ⅻ", "①", "0",
    "it's", "don't", "we're", "they've", "I'm", "you'll", "he'd", "IT'S", "rock'n'roll", "'tis",
    "<|startoftext|>", "<|endoftext|>",
]
SEPARATORS = [" ", " ", ", ", ",", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", " | ", ""]
CASES = [str, str, str.upper, str.title, str.swapcase]


def generated_prompts(count=420, seed=0):
    """`count` prompts of random pieces, separators and casing; one in ten is very long."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length = rng.randint(40, 120) if rng.random() < 0.1 else rng.randint(1, 12)
        pieces = [rng.choice(PIECES) for _ in range(length)]
        text = "".join(piece + rng.choice(SEPARATORS) for piece in pieces)
        prompts.append(rng.choice(CASES)(text))
    return prompts


def hand_written_prompts():
    """The prompts of PROMPTS_FILE (one per line, "#" lines are comments) and ESCAPED_PROMPTS."""
    lines = PROMPTS_FILE.read_text(encoding="utf-8").split("\n")
    return [line for line in lines if line and not line.startswith("#")] + ESCAPED_PROMPTS


CORPUS = list(dict.fromkeys(hand_written_prompts() + generated_prompts()))


@pytest.fixture(scope="session")
def tokenizer():
    return CLIPTokenizer()


@pytest.fixture(scope="session")
def openai_tokenizer():
    """OpenAI's SimpleTokenizer from the clip-anytorch wheel, downloaded once into the test cache."""
    cache = Path(os.environ.get("SD_TF_TEST_CACHE", Path.home() / ".cache" / "sd_tf_tests"))
    wheel_pattern = "clip_anytorch-2.6.0-*.whl"
    if not list(cache.glob(wheel_pattern)):
        command = [sys.executable, "-m", "pip", "download", "--no-deps", CLIP_WHEEL, "-d", str(cache)]
        subprocess.run(command, check=True)
    source = cache / "clip_anytorch-2.6.0"
    with zipfile.ZipFile(next(cache.glob(wheel_pattern))) as wheel:
        wheel.extract("clip/simple_tokenizer.py", source)
        wheel.extract("clip/bpe_simple_vocab_16e6.txt.gz", source)
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", source / "clip" / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(source / "clip" / "bpe_simple_vocab_16e6.txt.gz"))


@pytest.fixture(scope="session")
def openai_ids(openai_tokenizer):
    """OpenAI's ids for every corpus prompt."""
    return [openai_tokenizer.encode(prompt) for prompt in CORPUS]


def mismatches(tokenizer, openai_ids):
    """(prompt, our ids, OpenAI's ids) for each corpus prompt where the two differ."""
    ours = [tokenizer.encode(prompt) for prompt in CORPUS]
    return [(prompt, a, b) for prompt, a, b in zip(CORPUS, ours, openai_ids) if a != b]


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 500
    assert sum(len(prompt) > 500 for prompt in CORPUS) >= 20


def test_encode_matches_openai(tokenizer, openai_ids):
    wrong = mismatches(tokenizer, openai_ids)
    report = "\n".join(f"{prompt!r}\n  ours:   {a}\n  openai: {b}" for prompt, a, b in wrong[:5])
    assert not wrong, f"{len(wrong)} of {len(CORPUS)} prompts differ, first ones:\n{report}"


def unescape_only_once():
    """A stand-in for the html module that unescapes on every other call only (clean_text calls it twice)."""
    calls = itertools.count()
    return types.SimpleNamespace(unescape=lambda text: html.unescape(text) if next(calls) % 2 == 0 else text)


@pytest.mark.parametrize(
    "module_name, stand_in",
    [
        ("ftfy", lambda: types.SimpleNamespace(fix_text=lambda text: text)),
        ("html", lambda: types.SimpleNamespace(unescape=lambda text: text)),
        ("html", unescape_only_once),
    ],
    ids=["no ftfy", "no html unescape", "html unescape once"],
)
def test_corpus_catches_a_missing_cleaning_step(tokenizer, openai_ids, monkeypatch, module_name, stand_in):
    """Without this cleaning step test_encode_matches_openai would fail on several prompts."""
    monkeypatch.setattr(clip_tokenizer, module_name, stand_in())
    assert len(mismatches(tokenizer, openai_ids)) >= 5


def test_attributes(tokenizer):
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert (tokenizer.start_token_id, tokenizer.end_token_id) == (START_TOKEN_ID, END_TOKEN_ID)
    assert (tokenizer.pad_token_id, tokenizer.max_length) == (END_TOKEN_ID, MAX_LENGTH)
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_call_pads_with_end_token_by_default(tokenizer):
    prompts = ["a photo of a cat", "Hello, World!", ""]
    rows = tokenizer(prompts)
    assert rows.shape == (3, MAX_LENGTH)
    assert rows.dtype == np.int32
    for row, prompt in zip(rows, prompts):
        ids = tokenizer.encode(prompt)
        expected = [START_TOKEN_ID, *ids, END_TOKEN_ID] + [END_TOKEN_ID] * (MAX_LENGTH - len(ids) - 2)
        assert row.tolist() == expected


def test_call_pads_with_given_id_and_length(tokenizer):
    rows = tokenizer("a photo of a cat", max_length=10, pad_token_id=0)
    assert rows.tolist() == [[START_TOKEN_ID, 320, 1125, 539, 320, 2368, END_TOKEN_ID, 0, 0, 0]]


def test_call_truncates_keeping_end_token_and_warns(tokenizer):
    kept = "a photo of a cat " * 15  # 75 tokens: exactly what fits between start and end
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = tokenizer(kept)[0]
    assert row[-1] == END_TOKEN_ID and row[-2] == 2368

    with pytest.warns(UserWarning, match="purple elephant"):
        rows = tokenizer([kept + "purple elephant", "short"])
    assert rows.shape == (2, MAX_LENGTH)
    assert rows[0].tolist() == row.tolist()


def test_decode_round_trip(tokenizer):
    for text in ["a photo of an astronaut riding a horse on mars", "café au lait , 東京 🎨 ! 4 cats"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text + " "
        assert tokenizer.decode(tokenizer(text)[0]) == text + " "


ASCII_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "Portrait of a woman, (masterpiece:1.2), [blurry], {highres}, 8K UHD, f/1.8",
    "It's a DOG's life; they've got 100 toys -- wow... ~~~ @#$%^&*",
    "tabs\tand\nnewlines   and  spaces",
    "a photo of a cat " * 20,
]


@pytest.mark.filterwarnings("ignore:The following part of the prompt was truncated")
@pytest.mark.parametrize("pad_token, pad_token_id", [("<|endoftext|>", END_TOKEN_ID), ("!", 0)])
def test_save_pretrained_loads_in_transformers(tmp_path, pad_token, pad_token_id):
    import transformers

    ours = CLIPTokenizer(pad_token=pad_token)
    ours.save_pretrained(tmp_path)
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert theirs.pad_token_id == pad_token_id
    # transformers splits text on its special tokens, so with pad "!" it reads "!!" as two "!".
    prompts = ASCII_PROMPTS + (["Hello, World!!"] if pad_token_id == END_TOKEN_ID else [])
    expected = theirs(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    assert ours(prompts).tolist() == expected

    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert (loaded.pad_token_id, loaded.max_length) == (pad_token_id, MAX_LENGTH)
    assert loaded(prompts).tolist() == expected
    loaded.save_pretrained(tmp_path / "again")
    for name in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / name).read_bytes()


def test_from_pretrained_uses_given_merges(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    merges_file = tmp_path / "merges.txt"
    merges_file.write_text("\n".join(merges_file.read_text(encoding="utf-8").split("\n")[:101]), encoding="utf-8")
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(loaded.encode("photograph")) > len(tokenizer.encode("photograph")) == 1


def write_config(folder, special_tokens_map=None, tokenizer_config=None):
    """A tokenizer folder with only the given JSON files (so the shipped vocabulary is used)."""
    folder.mkdir()
    for name, content in [("special_tokens_map.json", special_tokens_map), ("tokenizer_config.json", tokenizer_config)]:
        if content is not None:
            (folder / name).write_text(json.dumps(content), encoding="utf-8")
    return folder


def test_from_pretrained_reads_pad_token_and_max_length(tmp_path):
    end_token_as_dict = {"content": "<|endoftext|>", "lstrip": False, "rstrip": False, "special": True}
    disagreeing = write_config(
        tmp_path / "disagreeing",
        special_tokens_map={"pad_token": "!"},
        tokenizer_config={"pad_token": end_token_as_dict, "model_max_length": 64},
    )
    loaded = CLIPTokenizer.from_pretrained(disagreeing)
    assert (loaded.pad_token_id, loaded.max_length) == (0, 64)
    assert loaded("a cat").shape == (1, 64)

    only_config = write_config(tmp_path / "only_config", tokenizer_config={"pad_token": {"content": "!"}})
    assert CLIPTokenizer.from_pretrained(only_config).pad_token_id == 0

    dict_in_map = write_config(tmp_path / "dict_in_map", special_tokens_map={"pad_token": end_token_as_dict})
    assert CLIPTokenizer.from_pretrained(dict_in_map).pad_token_id == END_TOKEN_ID

    defaults = CLIPTokenizer.from_pretrained(write_config(tmp_path / "empty"))
    assert (defaults.pad_token_id, defaults.max_length) == (END_TOKEN_ID, MAX_LENGTH)


def test_importing_the_tokenizer_does_not_import_tensorflow():
    code = "import sys, sd_tf.tokenizer; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})
