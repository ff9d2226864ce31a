"""Training data for AHN self-distillation (``ahn_ops.distill``).

Every dataset here is *indexable and deterministic*: ``ds[i]`` is a ``LongTensor [T]`` that
depends only on the dataset's seed and ``i``. The trainer reads global sample indices
``step * global_batch + j``, so

* resuming needs one integer (the next sample index) instead of an iterator's state, and
* ``N`` ranks x ``M`` micro-batches x ``A`` accumulation steps read exactly the samples one
  rank reads with ``N*M*A`` samples per step: the loss curve does not depend on the split.

Sources:

* :class:`SyntheticRetrieval`: key-value retrieval or passkey in distractor text, generated
  in-repo, byte-level (256 bytes + :data:`SPECIALS`). ``example(i, length, needle_at)`` also
  returns where the answer sits, for the accuracy evaluation of ``python/retrieval_demo.py``.
* :class:`TokenChunks`: local ``.txt`` / ``.jsonl`` files (``{"text": ...}`` per line),
  tokenised byte-level or with a Hugging Face tokenizer directory, concatenated with EOS and
  cut into ``seq_len`` chunks, visited in a fresh permutation each epoch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

__all__ = ["ByteTokenizer", "SyntheticRetrieval", "TokenChunks", "build_dataset", "BYTE_VOCAB", "SPECIALS",
           "PAD_ID", "BOS_ID", "EOS_ID"]

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
SPECIALS = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID}
BYTE_VOCAB = 264  # 256 bytes + 3 specials, rounded up to a multiple of 8


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus ``<pad>`` 256, ``<bos>`` 257, ``<eos>`` 258."""

    vocab_size = BYTE_VOCAB
    pad_token_id, bos_token_id, eos_token_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# a small fixed vocabulary of distractor words (no digits: numbers in the text are either the
# needle or deliberate distractor numbers)
_WORDS = ("the of and to in is was for on that with as by at from his her it an are be this which or had "
          "not but were they all have one their there been has when who will more no if out so said what up "
          "its about into than them can only other new some could time these two may then do first any my "
          "now such like our over man me even most made after also did many before must through back years "
          "where much your way well down should because each just those people how too little state good "
          "very make world still own see men work long get here between both life being under never day "
          "same another know while last might us great old year off come since against go came right used "
          "take three garden river stone window music paper silver winter morning forest letter harbor").split()


# a passkey cue ending in one of these is followed by the value directly ("passkey=48213"), else by a
# space ("the pass key is 48213"): with a rare last byte, the byte that precedes the answer occurs only
# in the needle and the query, so one-token induction (find it, copy what followed) solves the task
_CUE_ENDS = ":=#>"


def _rng(seed: int, index: int, salt: int = 0) -> random.Random:
    # one independent stream per (seed, index): sample i never depends on how many came before
    return random.Random((int(seed) * 1_000_003 + int(index)) * 7919 + salt)


class SyntheticRetrieval:
    """Byte-level retrieval in distractor text.

    ``task="passkey"``: ``"... the pass key is 48213. ..."`` somewhere in filler words, the sequence
    ends with ``"the pass key is 48213."`` again (the answer is the digits after the repeat of the
    cue; a cue ending in ``:``, ``=``, ``#`` or ``>`` is followed by the digits without a space).
    ``task="kv"``: ``n_pairs`` records ``"key 7kq2 = 48213."`` in filler; the end asks for one
    key: ``"key 7kq2 = 48213."``. Optional distractor numbers (``"in 1934"``) make copying "any
    number" wrong.

    Args:
        seq_len: tokens per training sample (a BOS, then text, truncated/padded with filler).
        task: ``"passkey"`` or ``"kv"``. n_digits: length of the value. n_pairs: kv records.
        cue: the passkey's cue text (a short one, e.g. ``"pk"``, for toy-sized runs).
        distractor_numbers: probability per filler word of a random 4-digit number.
        seed: dataset seed.
        phrase_pool: 0 (default): filler words drawn independently. ``n > 0``: each sample draws ``n``
            phrases of 2-5 words and its filler repeats them in random order, so copying what
            followed an earlier occurrence pays off all along the text (a small model forms the
            copying circuit the retrieval needs much sooner; python/retrieval_demo.py).

    ``ds[i]`` -> ``LongTensor [seq_len]``; ``ds.example(i, length, needle_at)`` -> dict with
    ``input_ids`` (``[length]``), ``answer_start`` (index of the first answer token),
    ``answer_len`` and ``needle_pos`` (first token of the record holding the answer).
    """

    def __init__(self, seq_len: int, task: str = "passkey", n_digits: int = 5, n_pairs: int = 4,
                 distractor_numbers: float = 0.0, seed: int = 0, cue: str = "the pass key is",
                 phrase_pool: int = 0):
        if task not in ("passkey", "kv"):
            raise ValueError(f"task must be 'passkey' or 'kv', got {task!r}")
        self.seq_len, self.task, self.n_digits, self.n_pairs = int(seq_len), task, int(n_digits), int(n_pairs)
        self.distractor_numbers, self.seed, self.cue = float(distractor_numbers), int(seed), str(cue)
        if int(phrase_pool) < 0:
            raise ValueError(f"phrase_pool must be >= 0, got {phrase_pool}")
        self.phrase_pool = int(phrase_pool)
        self.tokenizer = ByteTokenizer()
        self.vocab_size = BYTE_VOCAB

    def __len__(self) -> int:  # an endless stream: any index is valid
        return 1 << 62

    def _filler(self, rng: random.Random, n_bytes: int) -> List[int]:
        out: List[int] = []
        pool = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 5))) for _ in range(self.phrase_pool)]
        while len(out) < n_bytes:
            if self.distractor_numbers and rng.random() < self.distractor_numbers:
                w = f"in {rng.randrange(1000, 10000)}"
            else:
                w = rng.choice(pool) if pool else rng.choice(_WORDS)
            out += list((w + " ").encode())
        return out[:n_bytes]

    def _value(self, rng: random.Random) -> str:
        return "".join(rng.choice("0123456789") for _ in range(self.n_digits))

    def _key(self, rng: random.Random) -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(4))

    def _records(self, rng: random.Random):
        """(needle record, other records, query prefix) as byte lists; the answer follows the query."""
        val = self._value(rng)
        if self.task == "passkey":
            sep = "" if self.cue[-1:] in _CUE_ENDS else " "
            return list(f" {self.cue}{sep}{val}. ".encode()), [], list(f" {self.cue}{sep}".encode()), val
        keys = set()
        while len(keys) < self.n_pairs:
            keys.add(self._key(rng))
        keys = sorted(keys)
        rng.shuffle(keys)
        others = [list(f" key {k} = {self._value(rng)}. ".encode()) for k in keys[1:]]
        return list(f" key {keys[0]} = {val}. ".encode()), others, list(f" key {keys[0]} = ".encode()), val

    def example(self, index: int, length: Optional[int] = None, needle_at: Optional[int] = None,
                salt: int = 0) -> Dict:
        """One sample of ``length`` tokens; ``needle_at`` fixes the needle's first token (else random)."""
        L = self.seq_len if length is None else int(length)
        rng = _rng(self.seed, index, salt)
        needle, others, query, val = self._records(rng)
        tail = query + list(val.encode()) + list(".".encode())
        body = L - 1 - len(tail)  # BOS + body + tail
        if body < len(needle) + sum(map(len, others)):
            raise ValueError(f"length {L} too short for the {self.task} records")
        if needle_at is None:
            needle_at = 1 + rng.randrange(0, body - len(needle) + 1)
        if not 1 <= needle_at <= body - len(needle) + 1:
            raise ValueError(f"needle_at={needle_at} outside [1, {body - len(needle) + 1}] for length {L}")
        # filler, then the needle written over it at its position, then the other records at random
        # positions that overlap neither the needle nor each other
        seq = self._filler(rng, body)
        seq[needle_at - 1:needle_at - 1 + len(needle)] = needle
        taken = [(needle_at - 1, needle_at - 1 + len(needle))]
        for rec in others:
            for _ in range(1000):
                s0 = rng.randrange(0, body - len(rec) + 1)
                if all(s0 + len(rec) <= a or s0 >= e for a, e in taken):
                    break
            else:
                raise ValueError(f"length {L} too short to place {len(others) + 1} records apart")
            seq[s0:s0 + len(rec)] = rec
            taken.append((s0, s0 + len(rec)))
        ids = [BOS_ID] + seq + tail
        return dict(input_ids=torch.tensor(ids, dtype=torch.long), answer_start=1 + body + len(query),
                    answer_len=len(val), needle_pos=needle_at)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.example(index)["input_ids"]

    def layout(self, length: int) -> Dict[str, int]:
        """Fixed geometry of every ``length``-token example: ``answer_start``, ``answer_len``,
        ``needle_len`` (tokens of the record holding the answer) and ``body``. The needle lies entirely
        outside a window ``W`` of the first answer query (position ``answer_start - 1``) when
        ``needle_at <= answer_start - W - needle_len``."""
        needle, _, query, val = self._records(_rng(self.seed, 0))
        tail = len(query) + len(val) + 1
        body = int(length) - 1 - tail
        return dict(answer_start=1 + body + len(query), answer_len=len(val), needle_len=len(needle), body=body)


class TokenChunks:
    """``seq_len``-token chunks of local text files (``.txt``, or ``.jsonl`` with a ``text`` field).

    Args:
        paths: files or directories (``*.txt`` / ``*.jsonl`` inside, sorted).
        seq_len: tokens per sample.
        tokenizer: None (byte-level, :class:`ByteTokenizer`) or a Hugging Face tokenizer directory.
        seed: permutation seed (a fresh permutation of the chunks each epoch).
        text_key: the jsonl field.
    """

    def __init__(self, paths: Union[str, Sequence[str]], seq_len: int, tokenizer: Optional[str] = None,
                 seed: int = 0, text_key: str = "text"):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        files: List[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files += sorted(x for x in p.rglob("*") if x.suffix in (".txt", ".jsonl", ".json"))
            elif p.exists():
                files.append(p)
            else:
                raise FileNotFoundError(f"data file not found: {p}")
        if not files:
            raise FileNotFoundError(f"no .txt/.jsonl files in {list(paths)}")
        if tokenizer is None or tokenizer == "bytes":
            self.tokenizer = ByteTokenizer()
            encode, eos = self.tokenizer.encode, EOS_ID
            self.vocab_size = BYTE_VOCAB
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            encode = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
            eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
            self.vocab_size = len(self.tokenizer)
        ids: List[int] = []
        for f in files:
            with open(f, encoding="utf-8") as fh:
                if f.suffix in (".jsonl", ".json"):
                    for line in fh:
                        line = line.strip()
                        if line:
                            ids += encode(json.loads(line)[text_key]) + [eos]
                else:
                    ids += encode(fh.read()) + [eos]
        self.seq_len, self.seed = int(seq_len), int(seed)
        n = len(ids) // self.seq_len
        if n == 0:
            raise ValueError(f"{len(ids)} tokens in {len(files)} files: fewer than one chunk of {seq_len}")
        self.tokens = torch.tensor(ids[: n * self.seq_len], dtype=torch.long).view(n, self.seq_len)
        self._perm_cache: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(len(self), generator=g)}
        return self._perm_cache[epoch]

    def __getitem__(self, index: int) -> torch.Tensor:
        epoch, i = divmod(int(index), len(self))
        return self.tokens[self._perm(epoch)[i]]


def build_dataset(data: Optional[Sequence[str]], seq_len: int, *, synthetic: Optional[str] = None,
                  tokenizer: Optional[str] = None, seed: int = 0, **synthetic_kw):
    """Files (``data``) or a synthetic task (``synthetic="passkey"|"kv"``)."""
    if synthetic:
        return SyntheticRetrieval(seq_len, task=synthetic, seed=seed, **synthetic_kw)
    if not data:
        raise ValueError("give data files or a synthetic task")
    return TokenChunks(data, seq_len, tokenizer=tokenizer, seed=seed)
