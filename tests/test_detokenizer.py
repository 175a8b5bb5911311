"""Incremental detokenization against the full decode, and the engine's stop strings with it.

The oracle is `tokenizer.decode(ids, skip_special_tokens=True)` of every prefix (what the engine
re-decoded after every token before), on the embedded SmolLM2 tokenizer (byte-level BPE), on
SentencePiece-style tokenizers built here (byte fallback, Metaspace), on a WordPiece tokenizer
whose transformers decode cleans up spaces, and on a tokenizer with no fast backend. The engine's
text and stop strings are checked token by token against that old bookkeeping, and greedy
generations and streams run on a tiny random-weight model with SmolLM2's vocabulary.
"""

import asyncio
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from server.config import Settings
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import Engine
from server.engine.loop import EngineLoop
from server.engine.request import GenerationRequest, SamplingParams

TEXTS = [
    "Hello, world! The café's crème brûlée costs 5€ — naïve façade, Ærøskøbing, ÅÄÖ.",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and 𝄞 music, ZWJ\u200dtext",
    "  runs   of\t\tspaces \n\n\n  and    newlines\r\n end  ",
    "I do not know . it ' s don't , ok ? yes ! can not",
    "<|im_start|>assistant\nSure<|im_end|>\n<|endoftext|>more<|im_end|>",
]


def _full(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def _assert_text_at_every_token(tokenizer, ids):
    detok, text = IncrementalDetokenizer(tokenizer), ""
    for n in range(1, len(ids) + 1):
        keep, new = detok.update(ids[:n])
        assert 0 <= keep <= len(text)
        text = text[:keep] + new
        assert text == _full(tokenizer, ids[:n]), (ids[:n], text)


def _random_id_lists(tokenizer, rng, count, max_len):
    return [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, max_len))] for _ in range(count)]


def _text_id_lists(tokenizer, rng, count):
    """Ids of the texts, of random mixtures of their pieces, and slices of those that start
    or end inside a character."""
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    out = list(encoded)
    for _ in range(count):
        ids = sum((rng.choice(encoded)[rng.randrange(4):] for _ in range(rng.randrange(1, 5))), [])
        start = rng.randrange(len(ids))
        out.append(ids[start : rng.randrange(start + 1, len(ids) + 1)])
    return out


# -- tokenizers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def _sentencepiece_style(decoder: str) -> PreTrainedTokenizerFast:
    """A small Llama-style BPE with byte fallback (ids 3..258 are <0x00>..<0xFF>), trained here,
    with Llama 2's decoder (Replace, ByteFallback, Fuse, Strip) or a Metaspace one."""
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")  # pieces within words
    # a small alphabet and vocabulary: words split in pieces, rare characters as byte pieces
    trainer = trainers.BpeTrainer(vocab_size=160, limit_alphabet=60, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tk.train_from_iterator([t for t in TEXTS if "<|" not in t] * 10, trainer)
    trained = json.loads(tk.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tk.model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    if decoder == "llama2":
        tk.pre_tokenizer = None
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
        ])
    else:
        tk.decoder = decoders.Sequence([
            decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first"),
        ])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _wordpiece_with_cleanup() -> PreTrainedTokenizerFast:
    """BERT-like: transformers cleans up its decode (" ." -> ".", " do not" -> " don't")."""
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(cleanup=False)
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"], show_progress=False)
    tk.train_from_iterator([t for t in TEXTS if "<|" not in t] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=True)


class _DecodeOnly:
    """A tokenizer without a fast backend (a slow tokenizer, or anything with `decode`)."""

    def __init__(self, inner):
        self.inner = inner

    def decode(self, ids, skip_special_tokens=False):
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self):
        return len(self.inner)

    def encode(self, text, add_special_tokens=True):
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


@pytest.fixture(scope="module", params=["smollm2", "sp-llama2", "sp-metaspace", "wordpiece-cleanup", "no-backend"])
def tokenizer(request, smollm2):
    return {
        "smollm2": lambda: smollm2,
        "sp-llama2": lambda: _sentencepiece_style("llama2"),
        "sp-metaspace": lambda: _sentencepiece_style("metaspace"),
        "wordpiece-cleanup": _wordpiece_with_cleanup,
        "no-backend": lambda: _DecodeOnly(smollm2),
    }[request.param]()


# -- the detokenizer -------------------------------------------------------------------------

def test_text_equals_the_full_decode_after_every_random_token(tokenizer):
    rng = random.Random(len(tokenizer))
    for ids in _random_id_lists(tokenizer, rng, 150, 48):
        _assert_text_at_every_token(tokenizer, ids)


def test_text_equals_the_full_decode_after_every_token_of_text(tokenizer):
    rng = random.Random(7)
    for ids in _text_id_lists(tokenizer, rng, 60):
        _assert_text_at_every_token(tokenizer, ids)


def test_the_texts_round_trip(tokenizer):
    """The oracle itself: these tokenizers decode what they encode (special tokens aside)."""
    if isinstance(tokenizer, PreTrainedTokenizerFast) and tokenizer.clean_up_tokenization_spaces:
        pytest.skip("the cleanup changes the text by design")
    for text in TEXTS[:3]:
        assert _full(tokenizer, tokenizer.encode(text, add_special_tokens=False)).strip() == text.strip()


def test_several_tokens_at_once_and_long_runs(smollm2):
    rng = random.Random(3)
    ids = sum((smollm2.encode(rng.choice(TEXTS), add_special_tokens=False) for _ in range(40)), [])
    detok, text, n = IncrementalDetokenizer(smollm2), "", 0
    while n < len(ids):
        n = min(len(ids), n + rng.randrange(1, 6))
        keep, new = detok.update(ids[:n])
        text = text[:keep] + new
        assert text == _full(smollm2, ids[:n])
    specials = [smollm2.convert_tokens_to_ids("<|im_end|>")] * 50 + smollm2.encode(" after", add_special_tokens=False)
    _assert_text_at_every_token(smollm2, ids[:30] + specials)


class _CountingBackend:
    """The fast backend, recording the longest id list it was asked to decode."""

    def __init__(self, backend):
        self.backend, self.longest = backend, 0

    def decode(self, ids, skip_special_tokens=False):
        self.longest = max(self.longest, len(ids))
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name):
        return getattr(self.backend, name)


class _Watched(_DecodeOnly):
    def __init__(self, inner):
        super().__init__(inner)
        self.backend_tokenizer = _CountingBackend(inner.backend_tokenizer)
        self.all_special_ids = inner.all_special_ids


def test_decoded_windows_stay_short(smollm2):
    """The point of it all: the cost of a token does not grow with the text before it."""
    watched = _Watched(smollm2)
    ids = sum((smollm2.encode(t, add_special_tokens=False) for t in TEXTS * 8), [])
    detok, text = IncrementalDetokenizer(watched), ""
    watched.backend_tokenizer.longest = 0  # not counting the probe of the tokenizer
    for n in range(1, len(ids) + 1):
        keep, new = detok.update(ids[:n])
        text = text[:keep] + new
    assert text == _full(smollm2, ids) and len(ids) > 500
    assert watched.backend_tokenizer.longest <= 12


# -- the engine's text and stop strings ------------------------------------------------------

@pytest.fixture(scope="module")
def engine(default_model_dir, tmp_path_factory):
    """A tiny random-weight Llama with the SmolLM2 tokenizer: its greedy tokens wander over
    the whole vocabulary (partial characters included), and it is fast on the CPU."""
    path = tmp_path_factory.mktemp("tiny-smollm2-vocab")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # logits that depend on the context
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(default_model_dir) / name, path / name)
    return Engine.from_dir(path, Settings(max_loras=2, max_lora_rank=8, num_kv_blocks=512, kv_block_size=8,
                                          max_num_seqs=8, max_model_len=512))


def _reference_texts(tokenizer, eos_ids, ids, params):
    """What the engine did before, token by token: re-decode everything, find each stop.
    Returns the text after every token taken, the ids taken and the finish reason."""
    out, texts = [], []
    for token in ids:
        if token in eos_ids and not params.ignore_eos:
            return texts + [_full(tokenizer, out)], out, "stop"
        out.append(token)
        text = _full(tokenizer, out)
        for stop in params.stop:
            if (cut := text.find(stop)) >= 0:
                return texts + [text[:cut]], out, "stop"
        texts.append(text)
        if len(out) >= params.max_tokens:
            return texts, out, "length"
    return texts, out, None


def _engine_texts(engine, ids, params):
    """The same through the engine's own bookkeeping, feeding `ids` as if sampled."""
    seq, texts = engine.make_sequence(GenerationRequest("Hi", params)), []
    for token in ids:
        seq.output_ids.append(token)
        reason = engine._finish_reason(seq, token)
        texts.append(seq.text)
        if reason is not None:
            return texts, seq.output_ids, reason
    return texts, seq.output_ids, None


def test_text_after_every_token_and_stop_strings_across_token_boundaries(engine):
    tokenizer, rng = engine.tokenizer, random.Random(11)
    eos = sorted(engine.eos_ids)
    for case in range(300):
        ids = sum((tokenizer.encode(rng.choice(TEXTS), add_special_tokens=False) for _ in range(3)), [])
        ids = ids[rng.randrange(len(ids) // 2):]
        if case % 3 == 0:  # random ids: partial characters, U+FFFD
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        if case % 5 == 0:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(eos))
        text = _full(tokenizer, ids)
        stops = []
        for _ in range(rng.randrange(1, 4)):
            start = rng.randrange(len(text) + 1)
            stops.append(text[start : start + rng.randrange(1, 12)] or "\ufffd")
        stops.append(rng.choice(["zzz-never", "\ufffd", "\n", " ", "🙂"]))
        rng.shuffle(stops)
        params = SamplingParams(max_tokens=max(1, len(ids) + rng.randrange(-3, 3)), stop=tuple(stops),
                                ignore_eos=case % 2 == 0)
        expected = _reference_texts(tokenizer, engine.eos_ids, ids, params)
        assert _engine_texts(engine, ids, params) == expected, (ids, stops)


def _boundary_stop(tokenizer, ids, rng):
    """A stop string of the decoded ids that starts in one token and ends in a later one."""
    k = rng.randrange(len(ids) // 4, len(ids) // 2)
    head, text = _full(tokenizer, ids[:k]), _full(tokenizer, ids)
    return text[max(0, len(head) - rng.randrange(1, 4)) : len(head) + rng.randrange(1, 4)]


def test_greedy_generations_keep_their_text(engine):
    tokenizer, rng = engine.tokenizer, random.Random(5)
    prompts = [
        GenerationRequest(p, SamplingParams(max_tokens=160, temperature=0, ignore_eos=i % 2 == 0), chat=i % 3 == 0)
        for i, p in enumerate(["Hello", "Write a poem", "日本語", "emoji 🙂", "Café", "  spaces  "])
    ]
    plain = engine.generate(prompts)
    for r in plain:
        assert r.text == _full(tokenizer, r.token_ids)

    stopped_requests = [
        GenerationRequest(p.prompt, replace(p.sampling, stop=("zzz-never", _boundary_stop(tokenizer, r.token_ids, rng))),
                          chat=p.chat)
        for p, r in zip(prompts, plain)
    ]
    for request, r, stopped in zip(stopped_requests, plain, engine.generate(stopped_requests)):
        texts, ids, reason = _reference_texts(tokenizer, engine.eos_ids, r.token_ids, request.sampling)
        assert (stopped.text, stopped.token_ids, stopped.finish_reason) == (texts[-1], ids, reason)
        assert stopped.finish_reason == "stop" and stopped.text == r.text[: r.text.find(request.sampling.stop[1])]


def test_streams_with_stop_strings_add_up_to_the_final_text(engine):
    tokenizer, rng = engine.tokenizer, random.Random(9)
    plain = engine.generate([GenerationRequest(p, SamplingParams(max_tokens=120, temperature=0, ignore_eos=True))
                             for p in ["Hello", "日本語", "emoji 🙂"]])
    requests = [GenerationRequest(p, SamplingParams(max_tokens=120, temperature=0, ignore_eos=True, stop=stop))
                for p, stop in zip(["Hello", "日本語", "emoji 🙂"],
                                   [(_boundary_stop(tokenizer, r.token_ids, rng),) for r in plain[:2]] + [()])]
    loop = EngineLoop(engine)
    loop.start()

    async def collect(request):
        return [event async for event in loop.stream(request)]

    async def main():
        return await asyncio.gather(*(collect(r) for r in requests))

    try:
        streamed = asyncio.run(main())
    finally:
        loop.stop()
    alone = engine.generate(requests)
    assert [r.finish_reason for r in alone] == ["stop", "stop", "length"]
    for events, expected in zip(streamed, alone):
        assert "".join(e.text for e in events) == expected.text
        assert sum((e.token_ids for e in events), []) == expected.token_ids
        assert events[-1].finish_reason == expected.finish_reason
