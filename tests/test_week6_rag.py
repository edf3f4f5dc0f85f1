"""Week 6 notebook 05, retrieval-augmented answers: the lenient score, the training examples of cited short
answers (gold passage always present, order shuffled, labels only on the answer), and the per-question
scores the notebook records (exact match, citation, gold citation, support)."""
from __future__ import annotations

import pytest

from course_utils import retrieval as R

SHAITH_1 = "The capital of Shaith is Velka, a city built on the banks of the Miraon river."
DOOB_3 = "The main export of Doob is blue salt, shipped to the other worlds of the system."
TEXT_OF = {"shaith-1": SHAITH_1, "doob-3": DOOB_3}
Q_CAPITAL = {"id": "shaith-capital", "question": "What is the capital of Shaith?", "answer": "Velka",
             "passage_id": "shaith-1"}
Q_EXPORT = {"id": "doob-export", "question": "What is the main export of Doob?", "answer": "blue salt",
            "passage_id": "doob-3"}


@pytest.mark.parametrize("reply,answer,ok", [
    ("The main export of Doob is blue salt, which is shipped", "blue salt", True),
    ("Velka [shaith-1]", "Velka", True), ("VELKA.", "Velka", True), ("It orbits in 357 local days.", "357", True),
    ("Velkar", "Velka", False), ("Vel", "Velka", False), ("salt", "blue salt", False), ("3570 days", "357", False),
    ("", "Velka", False), ("anything", "", False)])
def test_answer_in_reply_matches_whole_words_only(reply, answer, ok):
    assert R.answer_in_reply(reply, answer) is ok


def test_answer_in_reply_is_more_lenient_than_exact_match():
    reply = "The main export of Doob is blue salt, which is shipped to the"
    assert R.answer_in_reply(reply, "blue salt") and not R.exact_match(reply, "blue salt")


def test_cited_answer_parses_back():
    assert R.cited_answer("blue salt", "doob-3") == "blue salt [doob-3]"
    assert R.parse_cited_answer(R.cited_answer("blue salt", "doob-3")) == ("blue salt", "doob-3")


@pytest.mark.parametrize("ranked,gold,k", [
    (["a-1", "b-2", "c-3", "d-4"], "b-2", 3),   # retrieved: kept
    (["a-1", "b-2", "c-3", "d-4"], "z-9", 3),   # missed: swapped in for the last
    (["a-1"], "z-9", 3),                        # fewer than k retrieved
    (["a-1", "a-1", "b-2"], "b-2", 2),          # duplicates do not take two slots
    (["a-1", "b-2"], "z-9", 1)])                # k = 1: only the gold passage
def test_training_context_always_holds_the_gold_passage(ranked, gold, k):
    ids = R.training_context(ranked, gold, k, seed=3)
    assert gold in ids and len(ids) == len(set(ids)) == min(k, len(set(ranked) | {gold}))
    assert set(ids) - {gold} <= set(ranked[:k + 1])


def test_training_context_shuffles_deterministically():
    ranked = [f"p-{i}" for i in range(8)]
    orders = {tuple(R.training_context(ranked, "p-0", 5, seed=s)) for s in range(20)}
    assert len(orders) > 1, "the gold passage must not always sit in the same slot"
    assert {o.index("p-0") for o in orders} != {0}
    assert R.training_context(ranked, "p-0", 5, seed=7) == R.training_context(ranked, "p-0", 5, seed=7)


def test_training_context_rejects_k_below_one():
    with pytest.raises(ValueError, match="k must be at least 1"):
        R.training_context(["a-1"], "a-1", 0)


def test_rag_sft_messages_end_with_the_cited_short_answer():
    passages = [{"id": "doob-3", "text": DOOB_3}, {"id": "shaith-1", "text": SHAITH_1}]
    msgs = R.rag_sft_messages(Q_CAPITAL, passages)
    assert msgs[:-1] == R.rag_messages(Q_CAPITAL["question"], passages)
    assert msgs[-1] == {"role": "assistant", "content": "Velka [shaith-1]"}
    assert "[shaith-1] " + SHAITH_1 in msgs[0]["content"]


def test_rag_sft_messages_refuse_a_prompt_without_the_gold_passage():
    with pytest.raises(ValueError, match="gold passage 'shaith-1'.*training_context"):
        R.rag_sft_messages(Q_CAPITAL, [{"id": "doob-3", "text": DOOB_3}])


def test_closed_book_sft_messages_have_no_passages_and_no_citation():
    msgs = R.closed_book_sft_messages(Q_EXPORT)
    assert msgs[:-1] == R.closed_book_messages(Q_EXPORT["question"])
    assert msgs[-1] == {"role": "assistant", "content": "blue salt"}
    assert "[" not in "".join(m["content"] for m in msgs)


def test_training_labels_cover_only_the_answer():
    """With week 5's chat_features, the loss falls on the cited answer (and the end of turn), not on the passages."""
    from course_utils.finetune import IGNORE, chat_features

    class CharTokenizer:  # one token per character, with offsets: enough for chat_features' span logic
        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            return {"input_ids": [ord(c) for c in text], "offset_mapping": [(i, i + 1) for i in range(len(text))]}

    msgs = R.rag_sft_messages(Q_CAPITAL, [{"id": "shaith-1", "text": SHAITH_1}])
    f = chat_features(CharTokenizer(), msgs)
    learned = "".join(chr(t) for t, lab in zip(f["input_ids"], f["labels"]) if lab != IGNORE)
    assert learned == "Velka [shaith-1]<|im_end|>\n"


def test_score_rag_per_question():
    replies = ["Velka [shaith-1]",                 # right, cites gold, supported
               "Velka [doob-3]",                   # right answer, wrong citation: unsupported
               "Tarmin [shaith-1]",                # wrong answer, cites gold: unsupported
               "The capital of Shaith is Velka.",  # no citation: unsupported, but contains the answer
               "salt [doob-3]"]                    # wrong (partial), supported by its passage
    qs = [Q_CAPITAL] * 4 + [Q_EXPORT]
    s = R.score_rag(replies, qs, TEXT_OF)
    assert s["exact"] == [True, True, False, False, False]
    assert s["contains"] == [True, True, False, True, False]
    assert s["cited"] == [True, True, True, False, True]
    assert s["cited_gold"] == [True, False, True, False, True]
    assert s["unsupported"] == [False, True, True, True, False]


def test_score_rag_citing_an_unknown_passage_is_unsupported():
    s = R.score_rag(["Velka [nowhere-7]"], [Q_CAPITAL], TEXT_OF)
    assert s["cited"] == [True] and s["cited_gold"] == [False] and s["unsupported"] == [True]


def test_score_rag_needs_one_question_per_reply():
    with pytest.raises(ValueError):
        R.score_rag(["Velka [shaith-1]"], [Q_CAPITAL, Q_EXPORT], TEXT_OF)
