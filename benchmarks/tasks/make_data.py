"""Build the local evaluation sets from the fixtures' held-out text (deterministic, no network).

    .venv/bin/python benchmarks/tasks/make_data.py

writes ``benchmarks/tasks/data/lambada_local.jsonl`` and ``heldout_ppl.jsonl`` (committed; a
test checks that they still match this script's output):

* ``lambada_local``: LAMBADA-style last-word prediction. Every held-out paragraph of at least
  ``MIN_LAMBADA_WORDS`` words that ends in ``<word>.``, reflowed onto one line with the final
  full stop dropped, as ``{"text": ...}`` in lambada_openai's format (context = all words but
  the last, target = " " + last word).
* ``heldout_ppl``: the held-out text cut at paragraph breaks into documents of at least
  ``MIN_DOCUMENT_CHARS`` characters, as ``{"text": ...}``, for rolling-loglikelihood
  perplexity. With the tiny tokenizer the longest is 1,778 tokens: at ``max_length`` 2048 each
  document is scored in one window, one forward pass from the prefix token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HELDOUT = REPO / "tests/assets/heldout.txt"
DATA_DIR = Path(__file__).resolve().parent / "data"
MIN_LAMBADA_WORDS = 15
MIN_DOCUMENT_CHARS = 1500
# A paragraph qualifies when its last word is alphabetic (3+ letters) and ends the sentence.
LAST_WORD = re.compile(r"\s([A-Za-z]{3,})\.$")


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def lambada_documents(text: str) -> list[dict]:
    documents = []
    for paragraph in paragraphs(text):
        words = paragraph.split()
        reflowed = " ".join(words)
        if len(words) >= MIN_LAMBADA_WORDS and LAST_WORD.search(reflowed):
            documents.append({"text": reflowed[:-1]})
    return documents


def perplexity_documents(text: str) -> list[dict]:
    documents, current = [], []
    for paragraph in paragraphs(text):
        current.append(paragraph)
        if sum(len(p) for p in current) >= MIN_DOCUMENT_CHARS:
            documents.append({"text": "\n\n".join(current)})
            current = []
    if current:
        documents.append({"text": "\n\n".join(current)})
    return documents


def render_jsonl(documents: list[dict]) -> str:
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in documents)


def expected_files() -> dict[Path, str]:
    """Each data file's path and the content this script gives it."""
    text = HELDOUT.read_text()
    return {
        DATA_DIR / "lambada_local.jsonl": render_jsonl(lambada_documents(text)),
        DATA_DIR / "heldout_ppl.jsonl": render_jsonl(perplexity_documents(text)),
    }


def main() -> None:
    DATA_DIR.mkdir(exist_ok=True)
    for path, content in expected_files().items():
        path.write_text(content)
        print(f"{path.relative_to(REPO)}: {content.count(chr(10))} documents")


if __name__ == "__main__":
    main()
