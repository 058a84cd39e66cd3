"""Held-out questions: prompt/answer split of SFT and preference rows, exact-match scoring."""

from __future__ import annotations

import pytest

from tunelab.errors import ConfigError
from tunelab.training.heldout import check_heldout, heldout_rows, score_heldout

IGNORE = -100
EOS = 9


def test_rows_split_at_the_first_trained_label_and_drop_stop_ids():
    # labels are shifted: labels[i] is the target after tokens[i], so the answer is tokens[3:]
    sft = {"tokens": [1, 2, 3, 4, 5, EOS], "labels": [IGNORE, IGNORE, 4, 5, EOS, IGNORE]}
    pair = {"chosen_tokens": [1, 7, 8], "chosen_labels": [7, 8, IGNORE], "rejected_tokens": [1, 6],
            "rejected_labels": [6, IGNORE]}
    untrained = {"tokens": [1, 2], "labels": [IGNORE, IGNORE]}
    rows = heldout_rows([untrained, sft, pair, sft], 2, stop_tokens=[EOS])
    assert [(r.prompt, r.answer) for r in rows] == [([1, 2, 3], [4, 5]), ([1], [7, 8])]


def test_score_counts_exact_text_matches(monkeypatch):
    from tunelab.training import heldout

    class Tok:
        stop_tokens, vocab_size = [EOS], 100

        def decode(self, ids):
            return " ".join(map(str, ids)) + " "  # surrounding whitespace is not part of the answer

        decode_generated = decode

    answers = iter([[4, 5], [7]])
    monkeypatch.setattr(heldout, "generate", lambda model, prompt, **kw: next(answers))
    rows = heldout_rows([{"tokens": [1, 2, 4, 5], "labels": [IGNORE, 4, 5, IGNORE]},
                         {"tokens": [1, 7, 8], "labels": [7, 8, IGNORE]}], 5, [EOS])
    score = score_heldout(object(), rows, Tok())
    assert (score.correct, score.accuracy, score.generated) == (1, 0.5, [[4, 5], [7]])


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "100"])
def test_bad_counts_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="heldout_accuracy: .* is not a positive row count"):
        check_heldout(bad)
    check_heldout(None)
    check_heldout(7)


def test_rows_that_cannot_match_stop_early_with_the_same_verdict(monkeypatch):
    """Generation of a row stops once its text has left the reference (not merely its ids: a
    different tokenization of the right text still counts), and the first rows, which are
    printed, run to the end; every verdict equals the one generating in full gives."""
    from tunelab.training import heldout

    pieces = {4: "mir", 5: "ror", 6: "mirror", 7: "x", 8: " "}

    class Tok:
        stop_tokens, vocab_size = [EOS], 100

        def decode(self, ids):
            return "".join(pieces[i] for i in ids)

        decode_generated = decode

    scripts = {(1,): [6, 8], (2,): [4, 5], (3,): [7, 7, 7, 7], (9,): [7, 7, 7, 7]}  # what the "model" says
    lengths = []

    def fake_generate(model, prompt, *, max_new_tokens, stop_tokens, stop_when=None):
        out = []
        for token in scripts[tuple(prompt)][:max_new_tokens]:
            out.append(token)
            if stop_when is not None and stop_when(out):
                break
        lengths.append(len(out))
        return out

    monkeypatch.setattr(heldout, "generate", fake_generate)
    rows = [heldout.HeldOutRow([p], [4, 5]) for p in (9, 1, 2, 3)]  # reference "mirror" as mir + ror
    score = score_heldout(object(), rows, Tok(), whole=1)
    assert score.right == [False, True, True, False]
    assert lengths == [4, 2, 2, 1]  # the printed row whole; " " after the answer kept going; "x" stopped at once
