"""Writes the small sample datasets the recipes point at (deterministic; our own text about Python's built-ins):
hellaswag_train.jsonl / hellaswag_val.jsonl (ctx, endings, label: NeMo's HellaSwag format) and chat_train.jsonl /
chat_val.jsonl (messages). Real runs point dataset.path at a local export of their own data, e.g. HellaSwag
(`datasets.load_dataset("Rowan/hellaswag")["train"].to_json("hellaswag_train.jsonl")` on a machine online).

    python recipes/data/make_samples.py
"""
import json
import random
from pathlib import Path

FACTS = {
    "len": "returns the number of items in a container",
    "print": "writes its arguments to standard output",
    "open": "opens a file and returns a file object",
    "range": "returns a sequence of integers",
    "sorted": "returns a new sorted list from the items of an iterable",
    "abs": "returns the absolute value of a number",
    "sum": "adds the items of an iterable and returns the total",
    "min": "returns the smallest item of an iterable",
    "max": "returns the largest item of an iterable",
    "isinstance": "checks whether an object is an instance of a class",
    "enumerate": "pairs each item of an iterable with its index",
    "zip": "iterates over several iterables in parallel",
    "reversed": "returns a reverse iterator over a sequence",
    "round": "rounds a number to a given precision",
    "input": "reads a line from standard input",
    "type": "returns the type of an object",
    "id": "returns the identity of an object",
    "hash": "returns the hash value of an object",
    "repr": "returns a printable representation of an object",
    "iter": "returns an iterator for an object",
    "next": "retrieves the next item from an iterator",
    "map": "applies a function to every item of an iterable",
    "filter": "keeps the items of an iterable for which a function is true",
    "chr": "returns the string of one character for a Unicode code point",
    "ord": "returns the Unicode code point of a one-character string",
    "hex": "converts an integer to a hexadecimal string",
    "bin": "converts an integer to a binary string",
    "divmod": "returns the quotient and the remainder of a division",
    "pow": "raises a number to a power",
    "getattr": "returns the value of a named attribute of an object",
    "setattr": "sets the value of a named attribute of an object",
    "callable": "checks whether an object can be called",
}
OPENINGS = ["In Python, the built-in function {f}()", "The function {f}()", "Calling {f}()", "Python's {f}()"]
QUESTIONS = ["What does {f}() do in Python?", "Explain the built-in {f}().", "What is {f}() for?"]


def main(out: Path = Path(__file__).parent):
    rng = random.Random(0)
    names = sorted(FACTS)
    rows = []
    for f in names:
        for opening in OPENINGS:
            wrong = rng.sample([g for g in names if g != f], 3)
            endings = [FACTS[g] + "." for g in wrong]
            label = rng.randrange(4)
            endings.insert(label, FACTS[f] + ".")
            rows.append({"ctx": opening.format(f=f), "endings": endings, "label": label})
    rng.shuffle(rows)
    chats = []
    for f in names:
        for question in QUESTIONS:
            chats.append({"messages": [{"role": "user", "content": question.format(f=f)},
                                       {"role": "assistant", "content": f"{f}() {FACTS[f]}."}]})
    rng.shuffle(chats)
    for name, items in (("hellaswag_train", rows[:96]), ("hellaswag_val", rows[96:]),
                        ("chat_train", chats[:80]), ("chat_val", chats[80:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


if __name__ == "__main__":
    main()
