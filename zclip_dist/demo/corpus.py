"""A reproducible character-level corpus generated from a seed: no files, no downloads.

A made-up language: a vocabulary of pronounceable words built from syllables, and sentences drawn from a
word-level Markov chain with Zipf-distributed, sparse transitions. A small GPT must learn spelling
(easy, fast loss drop) and which word follows which (slower), so the loss curve has the shape of real
pretraining while the whole corpus is a few hundred kilobytes made in well under a second.
"""

from __future__ import annotations

import torch

__all__ = ["ALPHABET", "VOCAB_SIZE", "generate_text", "encode", "decode", "Corpus"]

ALPHABET = "\n .,abcdefghijklmnopqrstuvwxyz"
VOCAB_SIZE = len(ALPHABET)
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
_ONSETS = ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "st", "tr", "kl", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "s", "l", "k", "m"]


def _words(gen: torch.Generator, count: int) -> list[str]:
    words: list[str] = []
    seen = set()
    while len(words) < count:
        n_syl = 1 + int(torch.randint(3, (), generator=gen))
        parts = []
        for _ in range(n_syl):
            parts.append(_ONSETS[int(torch.randint(len(_ONSETS), (), generator=gen))])
            parts.append(_VOWELS[int(torch.randint(len(_VOWELS), (), generator=gen))])
        parts.append(_CODAS[int(torch.randint(len(_CODAS), (), generator=gen))])
        word = "".join(parts)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def generate_text(seed: int = 0, n_chars: int = 400_000, n_words: int = 200, fanout: int = 6) -> str:
    """Text of about ``n_chars`` characters; the same seed gives the same text on every machine."""
    gen = torch.Generator().manual_seed(seed)
    words = _words(gen, n_words)
    # Each word has `fanout` likely successors with Zipf weights: learnable, not memorisable.
    successors = [torch.randperm(n_words, generator=gen)[:fanout].tolist() for _ in range(n_words)]
    zipf = 1.0 / torch.arange(1, fanout + 1, dtype=torch.float64)
    n_draws = n_chars // 4 + 16
    picks = torch.multinomial(zipf, n_draws, replacement=True, generator=gen).tolist()
    ends = (torch.rand(n_draws, generator=gen) < 0.12).tolist()
    commas = (torch.rand(n_draws, generator=gen) < 0.08).tolist()
    out: list[str] = []
    length = 0
    word = int(torch.randint(n_words, (), generator=gen))
    for i in range(n_draws):
        token = words[word] + ("." if ends[i] else "," if commas[i] else "") + ("\n" if ends[i] and i % 5 == 0 else " ")
        out.append(token)
        length += len(token)
        if length >= n_chars:
            break
        word = successors[word][picks[i]]
    return "".join(out)[:n_chars]


def encode(text: str) -> torch.Tensor:
    return torch.tensor([_INDEX[c] for c in text], dtype=torch.long)


def decode(tokens: torch.Tensor) -> str:
    return "".join(ALPHABET[int(t)] for t in tokens)


class Corpus:
    """Token stream plus deterministic batch sampling, keyed by (step, rank) so every run sees the same data."""

    def __init__(self, seed: int = 0, n_chars: int = 400_000, n_words: int = 200, fanout: int = 6) -> None:
        self.seed = seed
        self.tokens = encode(generate_text(seed, n_chars, n_words, fanout))

    def batch(self, step: int, rank: int, batch_size: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, ``[batch_size, context]`` each."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 4099 + rank)
        starts = torch.randint(len(self.tokens) - context - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(context + 1)
        window = self.tokens[idx]
        return window[:, :-1], window[:, 1:]
