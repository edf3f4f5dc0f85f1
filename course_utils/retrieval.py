"""Retrieval and retrieval-augmented generation (week 6): BM25 from scratch, MiniLM embeddings,
reciprocal-rank fusion, recall@k, and answers that cite the passage they come from.

Order of the file = order of the lesson: the documents -> words -> BM25 (Robertson et al., 1994, with
Lucene's idf) -> dense search (Reimers & Gurevych, 2019) -> fusion (Cormack et al., 2009) -> recall@k
-> prompts with numbered passages -> exact match, citations and the support check.
Production search engines add inverted indexes, sharding and approximate nearest neighbours
(FAISS, HNSW); at 200 passages a dense matrix is exact and instant.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Sequence

import torch

from .data import load_project_dataset

DOCS_FILES = ("passages", "dev", "test", "train")


# ----------------------------------------------------------------------------------------------
# The documents
# ----------------------------------------------------------------------------------------------
def load_passages() -> list[dict]:
    """The 200 passages about 40 fictional planets: {"id", "title", "text"}."""
    return load_project_dataset("documents", "passages", DOCS_FILES)


def load_questions(split: str = "test") -> list[dict]:
    """Questions {"id", "question", "answer", "passage_id", ...} of a split: "dev", "test" or "train"."""
    return load_project_dataset("documents", split, DOCS_FILES[1:])


# ----------------------------------------------------------------------------------------------
# Words and BM25
# ----------------------------------------------------------------------------------------------
def tokenize(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: 'Mount Fidun rises 7313 metres.' -> ['mount', 'fidun', ...]."""
    return re.findall(r"\w+", text.lower())


def bm25_scores(query: Sequence[str], docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """BM25 score of every document for a tokenised query (exercise 6.9).

    score(d) = sum over query tokens t (repeats count) of idf(t) * f(t,d)(k1+1) / (f(t,d) + k1(1 - b + b|d|/avgdl)),
    idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5)) (Lucene's, never negative); n_t = documents containing t.
    """
    counts = [Counter(d) for d in docs]
    n_docs = len(docs)
    avgdl = sum(len(d) for d in docs) / max(n_docs, 1)
    scores = []
    for d, tf in zip(docs, counts):
        s = 0.0
        for t in query:
            n_t = sum(t in c for c in counts)
            idf = math.log(1 + (n_docs - n_t + 0.5) / (n_t + 0.5))
            f = tf[t]
            s += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return scores


class BM25Index:
    """BM25 over passages, vectorised: the same formula as `bm25_scores`, with document frequencies counted once."""

    def __init__(self, passages: list[dict], k1: float = 1.5, b: float = 0.75):
        self.ids = [p["id"] for p in passages]
        self.k1, self.b = k1, b
        self.tf = [Counter(tokenize(p["text"])) for p in passages]
        self.lengths = torch.tensor([sum(c.values()) for c in self.tf], dtype=torch.float64)
        df = Counter(t for c in self.tf for t in c)
        n = len(passages)
        self.idf = {t: math.log(1 + (n - k + 0.5) / (k + 0.5)) for t, k in df.items()}

    def scores(self, query: str) -> torch.Tensor:
        """(N,) BM25 score of every passage."""
        norm = self.k1 * (1 - self.b + self.b * self.lengths / self.lengths.mean())  # (N,)
        total = torch.zeros(len(self.ids), dtype=torch.float64)
        for t in tokenize(query):
            f = torch.tensor([c[t] for c in self.tf], dtype=torch.float64)  # (N,) term frequency
            total += self.idf.get(t, 0.0) * f * (self.k1 + 1) / (f + norm)
        return total

    def search(self, query: str, k: int = 5) -> list[tuple[str, float]]:
        return _top(self.ids, self.scores(query), k)


def _top(ids: list[str], scores: torch.Tensor, k: int) -> list[tuple[str, float]]:
    order = torch.argsort(-scores, stable=True)[:k]  # ties: the earlier passage first
    return [(ids[i], float(scores[i])) for i in order.tolist()]


# ----------------------------------------------------------------------------------------------
# Dense search with sentence embeddings
# ----------------------------------------------------------------------------------------------
class DenseIndex:
    """Cosine similarity between MiniLM embeddings (384 numbers per text, unit length)."""

    def __init__(self, passages: list[dict], encoder: Any, batch_size: int = 64):
        self.ids = [p["id"] for p in passages]
        self.encoder = encoder
        self.vectors = self.encode([p["text"] for p in passages], batch_size)  # (N, 384)
        self.queries: dict[str, torch.Tensor] = {}  # query text -> its vector, filled by encode_queries

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        return self.encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                                   show_progress_bar=False).cpu().double()

    def encode_queries(self, queries: list[str]) -> None:
        """Embed many queries in one batch (much faster than one at a time) and remember them."""
        todo = [q for q in dict.fromkeys(queries) if q not in self.queries]
        if todo:
            self.queries.update(zip(todo, self.encode(todo)))

    def scores(self, query: str) -> torch.Tensor:
        self.encode_queries([query])
        return self.vectors @ self.queries[query]  # (N, 384) @ (384,) -> (N,) cosines

    def search(self, query: str, k: int = 5) -> list[tuple[str, float]]:
        return _top(self.ids, self.scores(query), k)


# ----------------------------------------------------------------------------------------------
# Fusion and recall@k
# ----------------------------------------------------------------------------------------------
def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], k: int = 60) -> list[tuple[str, float]]:
    """Fuse ranked id lists (exercise 6.10): score(d) = sum over lists containing d of 1 / (k + rank), rank from 1.

    Returns every id with its score, best first; equal scores keep the order in which ids were first seen.
    """
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])  # sorted() is stable


class HybridIndex:
    """BM25 and dense rankings fused by reciprocal rank: words and meaning both get a vote."""

    def __init__(self, bm25: BM25Index, dense: DenseIndex, depth: int = 50, k: int = 60):
        self.bm25, self.dense, self.depth, self.k = bm25, dense, depth, k

    def search(self, query: str, k: int = 5) -> list[tuple[str, float]]:
        lists = [[i for i, _ in index.search(query, self.depth)] for index in (self.bm25, self.dense)]
        return reciprocal_rank_fusion(lists, self.k)[:k]


def recall_at_k(ranked: Sequence[Sequence[str]], gold: Sequence[str], k: int) -> list[bool]:
    """Per question: is its gold passage among the first k results?"""
    return [g in list(r)[:k] for r, g in zip(ranked, gold, strict=True)]


def reciprocal_rank(ranked: Sequence[Sequence[str]], gold: Sequence[str]) -> list[float]:
    """Per question: 1 / rank of the gold passage (0 when it was not retrieved)."""
    return [1.0 / (list(r).index(g) + 1) if g in r else 0.0 for r, g in zip(ranked, gold, strict=True)]


# ----------------------------------------------------------------------------------------------
# Generation with the chat model (batched, greedy)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def chat_generate(model: Any, tokenizer: Any, conversations: list[list[dict]], *, max_new_tokens: int = 32,
                  batch_size: int = 8) -> list[str]:
    """Greedy replies of a chat model to several conversations, in left-padded batches (shortest first)."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    replies: list[str] = [""] * len(texts)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    end_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_ids,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
        for i, row in zip(idx, new):
            replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return replies


# ----------------------------------------------------------------------------------------------
# Retrieval-augmented answers with citations
# ----------------------------------------------------------------------------------------------
CLOSED_BOOK = "Answer the question with a few words only: a name or a number."
RAG_SYSTEM = ("Answer the question with a few words only, using the passages below, then the id of the passage "
              "you used in square brackets.\nExample: Velka [shaith-1]\n\nPassages:\n{passages}")


def closed_book_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": CLOSED_BOOK}, {"role": "user", "content": question}]


def rag_messages(question: str, passages: list[dict]) -> list[dict]:
    """The question, with the retrieved passages (each with its id) in the system message."""
    listed = "\n".join(f"[{p['id']}] {p['text']}" for p in passages)
    return [{"role": "system", "content": RAG_SYSTEM.format(passages=listed)}, {"role": "user", "content": question}]


def parse_cited_answer(reply: str) -> tuple[str, str | None]:
    """'Velka [shaith-1]' -> ('Velka', 'shaith-1'); no brackets -> (reply, None)."""
    m = re.search(r"\[([a-z]+-\d+)\]", reply)
    if m is None:
        return reply.strip(), None
    return (reply[: m.start()] + reply[m.end():]).strip(" .\n"), m.group(1)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, no 'metres'/'days'/'moons' units, single spaces."""
    words = re.findall(r"\w+", text.lower())
    return " ".join(w for w in words if w not in {"a", "an", "the", "metres", "meters", "days", "moons", "m"})


def exact_match(prediction: str, answer: str) -> bool:
    """Normalised prediction equals the normalised answer, or is the answer followed by nothing but filler."""
    p, a = normalize(prediction), normalize(answer)
    return p == a or p.endswith(" " + a) and len(p.split()) <= len(a.split()) + 3


def supported(prediction: str, passage_text: str | None) -> bool:
    """Is the (normalised) answer written in the cited passage? No citation -> unsupported."""
    if passage_text is None or not normalize(prediction):
        return False
    return f" {normalize(prediction)} " in f" {normalize(passage_text)} "


def answer_in_reply(reply: str, answer: str) -> bool:
    """Lenient score: do the answer's normalised words occur, as whole words, anywhere in the reply?

    'The main export of Doob is blue salt, which is shipped...' contains 'blue salt': right under this
    score, wrong under `exact_match`. It forgives a chatty format, and also rewards a reply that lists
    several candidates, so report it next to exact match, never instead of it.
    """
    a = normalize(answer)
    return bool(a) and f" {a} " in f" {normalize(reply)} "


# ----------------------------------------------------------------------------------------------
# Teaching the format: supervised examples of cited short answers (train questions only)
# ----------------------------------------------------------------------------------------------
def cited_answer(answer: str, passage_id: str) -> str:
    """The reply we train towards: 'Velka [shaith-1]' (short answer, then the id of the passage it comes from)."""
    return f"{answer} [{passage_id}]"


def training_context(ranked_ids: Sequence[str], gold_id: str, k: int = 3, *, seed: int = 0) -> list[str]:
    """k passage ids for a training prompt: the retriever's top k, with the gold passage swapped in for the
    last one when retrieval missed it, in a shuffled order (seeded).

    The gold passage is always present, so every target is answerable from the prompt; the shuffle keeps
    the model from learning "cite whatever comes first" instead of reading.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k}): a training prompt needs the gold passage")
    ids = list(dict.fromkeys(ranked_ids))[:k]
    if gold_id not in ids:
        ids = ids[: k - 1] + [gold_id]
    g = torch.Generator().manual_seed(seed)
    return [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]


def rag_sft_messages(question: dict, passages: list[dict]) -> list[dict]:
    """A training conversation: the retrieval prompt with `passages`, and the cited short answer as the reply."""
    if question["passage_id"] not in {p["id"] for p in passages}:
        raise ValueError(f"the gold passage {question['passage_id']!r} of question {question.get('id')!r} is not "
                         "among the passages: the target answer would not be supported (use training_context)")
    reply = cited_answer(question["answer"], question["passage_id"])
    return rag_messages(question["question"], passages) + [{"role": "assistant", "content": reply}]


def closed_book_sft_messages(question: dict) -> list[dict]:
    """A closed-book training conversation: the question alone, the short answer as the reply (no citation)."""
    return closed_book_messages(question["question"]) + [{"role": "assistant", "content": question["answer"]}]


def score_rag(replies: Sequence[str], questions: Sequence[dict], text_of: dict[str, str]) -> dict[str, list[bool]]:
    """Per-question scores of cited replies: strict and lenient correctness, citations, support.

    Keys (one bool per question): "exact" (exact match of the answer part), "contains" (`answer_in_reply`
    on the whole reply), "cited" (a [passage id] was written), "cited_gold" (it is the gold passage),
    "unsupported" (the answer is not written in the cited passage; no citation counts as unsupported).
    """
    parsed = [parse_cited_answer(r) for r in replies]
    out: dict[str, list[bool]] = {k: [] for k in ("exact", "contains", "cited", "cited_gold", "unsupported")}
    for (answer, pid), reply, q in zip(parsed, replies, questions, strict=True):
        out["exact"].append(exact_match(answer, q["answer"]))
        out["contains"].append(answer_in_reply(reply, q["answer"]))
        out["cited"].append(pid is not None)
        out["cited_gold"].append(pid == q["passage_id"])
        out["unsupported"].append(not supported(answer, text_of.get(pid)) if pid is not None else True)
    return out
