"""Next-character prediction: per-token loss and accuracy with padding ignored, text to
examples, the CharRNN model, and FedAvg end to end on a short embedded play, offline."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import losses, models, partition
from fedjax_sim.datasets import text

# A short public-domain text (Romeo and Juliet, Act 2 Scene 2), one client per speaker.
PLAY = """\
ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun.
JULIET: Ay me!
ROMEO: She speaks: O, speak again, bright angel! for thou art as glorious to this night.
JULIET: O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name.
ROMEO: Shall I hear more, or shall I speak at this?
JULIET: 'Tis but thy name that is my enemy; thou art thyself, though not a Montague.
NURSE: Madam!
JULIET: I come, anon. But if thou mean'st not well, I do beseech thee, cease thy suit.
NURSE: Madam!
JULIET: By and by, I come. To-morrow will I send.
ROMEO: So thrive my soul.
JULIET: A thousand times good night!
ROMEO: A thousand times the worse, to want thy light.
FRIAR: The grey-eyed morn smiles on the frowning night, chequering the eastern clouds.
FRIAR: Now, ere the sun advance his burning eye, the day to cheer and night's dank dew to dry.
"""


def speaker_texts(play: str) -> tuple[list[str], np.ndarray]:
  """Each line's speaker and text, for a natural split by speaker."""
  speakers, lines = zip(*(line.split(": ", 1) for line in play.splitlines()))
  return list(lines), np.array(speakers)


def test_one_label_loss_and_accuracy_are_plain_softmax_cross_entropy():
  logits = jax.random.normal(jax.random.key(0), (6, 4))
  y = jnp.array([0, 3, 1, 1, 2, 0])
  loss = losses.cross_entropy(lambda p, x: x)(None, logits, y)
  np.testing.assert_array_equal(loss, optax.softmax_cross_entropy_with_integer_labels(logits, y))
  np.testing.assert_array_equal(losses.correct(logits, y), jnp.argmax(logits, -1) == y)


def test_per_token_loss_and_accuracy_skip_ignored_labels():
  logits = jax.random.normal(jax.random.key(1), (2, 3, 5))
  y = jnp.array([[1, 2, losses.IGNORE_LABEL], [4, losses.IGNORE_LABEL, losses.IGNORE_LABEL]])
  per_token = np.asarray(jax.nn.log_softmax(logits))
  want = [-(per_token[0, 0, 1] + per_token[0, 1, 2]) / 2, -per_token[1, 0, 4]]
  loss = jax.jit(lambda l: losses.cross_entropy(lambda p, x: x)(None, l, y))  # one compile
  np.testing.assert_allclose(loss(logits), want, rtol=1e-6)
  pred = np.asarray(jnp.argmax(logits, -1))
  np.testing.assert_allclose(jax.jit(losses.correct)(logits, y),
                             [((pred[0, :2] == [1, 2]).mean()), float(pred[1, 0] == 4)])
  grads = jax.jit(jax.grad(lambda l: loss(l).sum()))(logits)
  assert np.isfinite(grads).all() and float(jnp.abs(grads[0, 2]).sum()) == 0.0


def test_evaluator_reports_per_token_metrics_without_padding():
  # A fixed "model": the logits are the inputs themselves.
  logits = np.asarray(jax.random.normal(jax.random.key(2), (5, 4, 3)))
  y = np.array([[0, 1, 2, 0], [1, 1, -1, -1], [2, 0, 1, -1], [0, -1, -1, -1], [1, 2, 0, 1]],
               np.int32)
  evaluate = fs.make_evaluator(
      lambda p, x: x, test=(logits, y),
      client_test=fs.from_clients([logits[:2], logits[2:]], [y[:2], y[2:]], num_classes=3))
  metrics = evaluate(None)
  valid = y >= 0
  log_p = np.asarray(jax.nn.log_softmax(logits))
  token_loss = -np.take_along_axis(log_p, np.maximum(y, 0)[..., None], -1)[..., 0]
  hits = (logits.argmax(-1) == y) & valid
  assert metrics["test_loss"] == pytest.approx(token_loss[valid].mean(), rel=1e-5)
  assert metrics["test_accuracy"] == pytest.approx(hits.sum() / valid.sum())
  assert metrics["client_test_accuracy"] == pytest.approx(hits.sum() / valid.sum())
  per_client = [hits[:2].sum() / valid[:2].sum(), hits[2:].sum() / valid[2:].sum()]
  assert metrics["client_test_accuracy_p10"] == pytest.approx(np.percentile(per_client, 10))


def test_ignored_label_is_allowed_only_for_per_token_labels():
  fs.from_clients([np.zeros((1, 3))], [np.array([[1, -1, -1]])], num_classes=3)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), found -1"):
    fs.from_clients([np.zeros((2, 3))], [np.array([1, -1])], num_classes=3)
  with pytest.raises(ValueError, match="found -2"):
    fs.from_clients([np.zeros((1, 3))], [np.array([[1, -2, 0]])], num_classes=3)


def test_text_becomes_shifted_next_character_examples():
  x, y = text.next_char_examples("To be, or not", seq_len=5)
  assert x.shape == y.shape == (3, 5)
  assert text.decode(x.reshape(-1)) == "To be, or no"
  ids = text.encode("To be, or not")
  np.testing.assert_array_equal(y.reshape(-1)[:12], ids[1:])
  assert (y.reshape(-1)[12:] == losses.IGNORE_LABEL).all()
  assert (x.reshape(-1)[12:] == text.PAD_ID).all()
  assert text.encode("~")[0] == text.UNKNOWN_ID
  assert text.next_char_examples("a", 5)[0].shape == (0, 5)
  lx, ly = text.leaf_shakespeare_examples(["abcd", "bcde"], ["e", "f"])
  assert text.decode(ly[1]) == "cdef" and text.decode(lx[0]) == "abcd"


def test_char_rnn_is_causal_and_batches_over_client_weights():
  model = models.char_rnn(text.vocab_size(), hidden=16, num_layers=2, seed=0)
  apply = jax.jit(model.apply)  # one compile for the three calls below
  x = jnp.asarray(text.next_char_examples(PLAY[:200], 12)[0][:4])
  out = apply(model.params, x)
  assert out.shape == (4, 12, text.vocab_size())
  changed = apply(model.params, x.at[:, 6].set(5))
  np.testing.assert_array_equal(out[:, :6], changed[:, :6])  # the past ignores the future
  assert not np.allclose(out[:, 6:], changed[:, 6:])
  other = models.char_rnn(text.vocab_size(), hidden=16, num_layers=2, seed=1).params
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), model.params, other)
  both = jax.vmap(model.apply)(stacked, jnp.stack([x, x]))
  np.testing.assert_allclose(both[0], out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(both[1], apply(other, x), rtol=1e-5, atol=1e-5)


def test_fedavg_learns_next_characters_of_a_short_play_offline():
  lines, speakers = speaker_texts(PLAY)
  by_speaker = partition.natural(speakers)
  texts = ["\n".join(lines[i] for i in part) for part in by_speaker]
  examples = [text.next_char_examples(t, seq_len=24) for t in texts]
  xs, ys = [e[0] for e in examples], [e[1] for e in examples]
  train = fs.from_clients(xs, ys, num_classes=text.vocab_size(), x_dtype=np.int32)
  assert train.num_clients == 4 and train.padding_efficiency < 1.0
  model = models.char_rnn(text.vocab_size(), embed_dim=8, hidden=32, num_layers=1, seed=0)
  algorithm = fs.fedavg(model.apply, client_optimizer=fs.client_optimizer("adam", 0.02),
                        clients_per_round=4, batch_size=4, epochs=1)
  evaluate = fs.make_evaluator(model.apply, test=(np.concatenate(xs), np.concatenate(ys)))
  before = evaluate(model.params)
  state = algorithm.init(model.params, jax.random.key(0))
  _, history = fs.run(algorithm, state, train, rounds=30, rounds_per_chunk=30,
                      evaluate=evaluate, progress=False)
  after = history[-1]
  # Most frequent next character (the space) as the baseline a model must beat.
  targets = np.concatenate(ys).reshape(-1)
  targets = targets[targets >= 0]
  baseline = np.bincount(targets).max() / len(targets)
  assert after["test_loss"] < 0.75 * before["test_loss"]
  print(f"before {before}, after {after['test_loss']:.3f} / {after['test_accuracy']:.3f}, "
        f"baseline {baseline:.3f}")
  assert after["test_accuracy"] > baseline + 0.1, (after, baseline)


def test_mixed_precision_keeps_token_ids_past_256():
  # The ids were cast to bfloat16 with the features: 257 became 256.
  model = fs.models.mixed_precision(fs.char_rnn(vocab_size=300, hidden=8, num_layers=1))
  logits = [model.apply(model.params, jnp.asarray([[token, 3.0]], jnp.float32))
            for token in (256.0, 257.0)]
  assert not np.allclose(logits[0][0, 0], logits[1][0, 0])
