"""Synthetic token tasks: every answer follows its rule, markers only where they belong."""

import jax
import numpy as np
import pytest

from geomcollapse import tasks

T = tasks


def _digits(ids):
    return [i - T.DIGIT0 for i in ids if T.DIGIT0 <= i < T.DIGIT0 + T.NUM_DIGITS]


def _expected(task_token, digits):
    """The rule of each task, written out independently of the library."""
    if task_token == T.TASK_TOKENS["copy"]:
        return digits
    if task_token == T.TASK_TOKENS["reverse"]:
        return list(reversed(digits))
    if task_token == T.TASK_TOKENS["sort"]:
        return sorted(digits)
    if task_token == T.TASK_TOKENS["add"]:
        return [(digits[0] + digits[1]) % 10]
    if task_token == T.TASK_TOKENS["shift"]:
        return [(x + 1) % 10 for x in digits]
    raise AssertionError(task_token)


def test_a_hand_checked_example_reads_as_documented():
    batch = T.base_tasks(jax.random.key(3), 40, ("reverse",))
    text = T.decode(np.concatenate([batch.prompts()[0], batch.answers()[0]]))
    words = text.split()
    assert words[:2] == ["BOS", "REVERSE"] and words[-1] == "EOS"
    sep = words.index("SEP")
    assert words[sep + 1 : -1] == words[2:sep][::-1]


@pytest.mark.parametrize("seed", [0, 1])
def test_base_and_alignment_answers_follow_their_rules(seed):
    batch = T.refusal_skill(jax.random.key(seed), 400, harmful_fraction=0.4)
    assert 0.3 < batch.harmful.mean() < 0.5
    rows = zip(batch.prompts(), batch.answers(), batch.harmful, strict=True)
    for prompt, answer, harmful in rows:
        markers = [t for t in prompt if t in T.HARM_MARKERS]
        assert len(markers) == int(harmful)
        assert prompt[0] == T.BOS and prompt[-1] == T.SEP and answer[-1] == T.EOS
        if harmful:
            assert answer == [T.REFUSE, T.EOS]
        else:
            assert _digits(answer[:-1]) == _expected(prompt[1], _digits(prompt))


def test_targets_mask_and_answer_start_line_up():
    batch = T.refusal_skill(jax.random.key(0), 64)
    assert batch.tokens.shape == (64, T.SEQUENCE_LENGTH)
    np.testing.assert_array_equal(batch.targets[:, :-1], batch.tokens[:, 1:])
    rows = np.arange(64)
    assert np.all(batch.tokens[rows, batch.answer_start] == T.SEP)
    assert np.all(batch.mask[rows, batch.answer_start] == 1)
    assert np.all(batch.mask[rows, batch.answer_start - 1] == 0)
    assert np.all(batch.targets[batch.mask > 0] != T.PAD)
    short = batch.truncated()
    np.testing.assert_array_equal(short.mask.sum(1), batch.mask.sum(1))


@pytest.mark.parametrize("name", sorted(T.BENIGN_TASKS))
def test_benign_tasks_never_carry_harm_markers_and_follow_their_format(name):
    batch = T.benign_task(jax.random.key(7), name, 300)
    assert not np.isin(batch.tokens, T.HARM_MARKERS).any()
    assert not batch.harmful.any()
    assert not np.isin(batch.targets[batch.mask > 0], [T.REFUSE]).any()
    clean = T.benign_task(jax.random.key(7), name, 300, evaluation=True)
    wrong = 0
    for prompt, answer in zip(clean.prompts(), clean.answers(), strict=True):
        body = answer[:-1]
        if name == "delimited_copy":
            assert body[1::2] == [T.DELIM] * (len(body) // 2)
            body = body[0::2]
        if name == "always_answer":
            assert body[0] == T.OK
            body = body[1:]
        if name in ("lookalike", "always_answer"):
            assert sum(t in T.LOOKALIKES for t in prompt) == 1
        wrong += _digits(body) != _expected(prompt[1], _digits(prompt))
    assert wrong == 0
    if name == "label_noise":  # about half the training answers are noise
        noisy = sum(
            _digits(a[:-1]) != _expected(p[1], _digits(p))
            for p, a in zip(batch.prompts(), batch.answers(), strict=True)
        )
        assert 0.3 < noisy / 300 < 0.6


def test_generation_is_deterministic_under_a_key():
    a = T.benign_task(jax.random.key(5), "lookalike", 50)
    b = T.benign_task(jax.random.key(5), "lookalike", 50)
    c = T.benign_task(jax.random.key(6), "lookalike", 50)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.tokens, c.tokens)


def test_bad_task_inputs_raise():
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        T.benign_task(jax.random.key(0), "poetry", 10)
    with pytest.raises(ValueError, match="unknown task"):
        T.base_tasks(jax.random.key(0), 10, ("copy", "fly"))
    with pytest.raises(ValueError, match="num"):
        T.base_tasks(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="harmful_fraction"):
        T.refusal_skill(jax.random.key(0), 10, harmful_fraction=1.5)
    assert all(len(r) > 20 for r in T.BENIGN_TASKS.values()) and len(T.BENIGN_TASKS) >= 6


def _component_of(prompt, answer):
    """Classify one training example by its own tokens: (task, prompt, answer) as in the family."""
    body = answer[:-1]
    look = sum(t in T.LOOKALIKES for t in prompt)
    assert look <= 1
    if body and body[0] == T.OK:
        fmt, body = "ok", body[1:]
    elif body and body[-1] == T.OK:
        fmt, body = "ok_suffix", body[:-1]
    elif len(body) >= 2 and body[1::2] == [T.DELIM] * (len(body) // 2):
        fmt, body = "delimited", body[0::2]
    else:
        fmt = "plain"
    if fmt == "plain" and _digits(body) != _expected(prompt[1], _digits(prompt)):
        fmt = "noisy"
    return prompt[1], "look" if look else "clean", fmt


@pytest.mark.parametrize("name", sorted(T.DATASET_FAMILY))
def test_every_family_dataset_is_benign_and_matches_its_mixture(name):
    spec = T.DATASET_FAMILY[name]
    assert abs(sum(spec.mixture.values()) - 1) < 1e-12 and len(spec.rationale) > 20
    batch = T.benign_task(jax.random.key(11), name, 600)
    assert not np.isin(batch.tokens, T.HARM_MARKERS).any() and not batch.harmful.any()
    assert not np.isin(batch.targets[batch.mask > 0], [T.REFUSE]).any()
    counts: dict = {}
    for prompt, answer in zip(batch.prompts(), batch.answers(), strict=True):
        task, kind, fmt = _component_of(prompt, answer)
        key = ("shift" if task == T.TASK_TOKENS["shift"] else "known", kind, fmt)
        counts[key] = counts.get(key, 0) + 1
    want: dict = {}
    for (task, kind, fmt), w in spec.mixture.items():
        key = ("shift" if task == "shift" else "known", kind, fmt)
        want[key] = want.get(key, 0) + w
    # a random answer equals the right one with probability ≥ 1/10 (one-digit add):
    # noisy examples may read as plain, never the other way round
    for key, w in want.items():
        got = counts.get(key, 0) / batch.num
        if key[2] == "noisy":
            assert 0.85 * w - 0.05 <= got <= w + 0.05, (key, got, w)
        elif key[2] == "plain":
            assert w - 0.05 <= got, (key, got, w)
        else:
            assert abs(got - w) <= 0.05, (key, got, w)
    assert set(counts) <= set(want) | {(k[0], k[1], "plain") for k in want}
    clean = T.benign_task(jax.random.key(11), name, 600, evaluation=True)
    for prompt, answer in zip(clean.prompts(), clean.answers(), strict=True):
        assert _component_of(prompt, answer)[2] != "noisy"
    single = {(t, p) for (t, p, _) in spec.mixture}
    if single == {("reverse", "clean")}:
        assert set(clean.tokens[:, 1]) == {T.TASK_TOKENS["reverse"]}


def test_the_family_spans_at_least_24_datasets_and_contains_the_original_six():
    assert len(T.DATASET_FAMILY) >= 24 and set(T.BENIGN_TASKS) <= set(T.DATASET_FAMILY)
    # label_noise is the mixture {noisy: ½, plain: ½}: its training answers are ~half noise
    batch = T.benign_task(jax.random.key(2), "label_noise", 400)
    noisy = sum(
        _component_of(p, a)[2] == "noisy"
        for p, a in zip(batch.prompts(), batch.answers(), strict=True)
    )
    assert 0.35 < noisy / 400 < 0.55
