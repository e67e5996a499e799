"""Text as token ids for next-character prediction (the keyboard use case).

Id 0 is padding and id 1 an unknown character; characters of the vocabulary follow.
A text becomes examples `(x, y)` of `seq_len` ids each, where `y` is `x` shifted by
one (the next character at every position), so that the loss is per token. The
last, shorter window of a text is padded: inputs with `PAD_ID`, labels with
`losses.IGNORE_LABEL`, which the loss and the metrics skip.
"""

from __future__ import annotations

import numpy as np

from fedjax_sim.losses import IGNORE_LABEL

PAD_ID, UNKNOWN_ID = 0, 1
# The characters of LEAF's Shakespeare (Caldas et al. 2018, "LEAF: A Benchmark for
# Federated Settings"), in LEAF's order.
SHAKESPEARE_CHARS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
                     "abcdefghijklmnopqrstuvwxyz}")


def vocab_size(chars: str = SHAKESPEARE_CHARS) -> int:
  """Number of token ids: padding, unknown, then one per character."""
  return len(chars) + 2


def encode(text: str, chars: str = SHAKESPEARE_CHARS) -> np.ndarray:
  """Token ids [len(text)] of a string; characters not in `chars` map to UNKNOWN_ID."""
  table = {c: i + 2 for i, c in enumerate(chars)}
  return np.array([table.get(c, UNKNOWN_ID) for c in text], dtype=np.int32)


def decode(ids, chars: str = SHAKESPEARE_CHARS) -> str:
  """The string of token ids (padding dropped, unknown shown as '?')."""
  return "".join(chars[i - 2] if i >= 2 else "?" for i in np.asarray(ids).tolist() if i != PAD_ID)


def next_char_examples(text: str, seq_len: int = 80, chars: str = SHAKESPEARE_CHARS
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Cuts a text into non-overlapping windows that predict each next character.

  Args:
    text: the text of one client (a speaker, a user).
    seq_len: characters per example.
    chars: the vocabulary.

  Returns:
    x int32 [n, seq_len] input ids and y int32 [n, seq_len] next-character ids,
    padded at the end of the last window (x with PAD_ID, y with IGNORE_LABEL).
    A text of fewer than 2 characters gives no example.
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  ids = encode(text, chars)
  n = max(0, -(-(len(ids) - 1) // seq_len))
  x = np.full((n, seq_len), PAD_ID, np.int32)
  y = np.full((n, seq_len), IGNORE_LABEL, np.int32)
  inputs, targets = ids[:-1], ids[1:]
  x.reshape(-1)[: len(inputs)] = inputs
  y.reshape(-1)[: len(targets)] = targets
  return x, y


def leaf_shakespeare_examples(xs, ys, chars: str = SHAKESPEARE_CHARS
                              ) -> tuple[np.ndarray, np.ndarray]:
  """LEAF Shakespeare examples (an 80-character string, the next character) as per-token
  examples: x is the string's ids and y the same shifted by one, ending with the next
  character, so every position is a target.

  Returns:
    x int32 [n, seq_len], y int32 [n, seq_len].
  """
  if not len(xs):
    return np.zeros((0, 0), np.int32), np.zeros((0, 0), np.int32)
  lengths = {len(s) for s in xs}
  if len(lengths) > 1:
    raise ValueError(f"LEAF Shakespeare inputs must have one length, found {sorted(lengths)}")
  x = np.stack([encode(s, chars) for s in xs])
  y = np.stack([encode(s[1:] + t, chars) for s, t in zip(xs, ys)])
  return x, y
