"""The CLI's bad-input cases: what a user types, the exit code, and the message the tests require in its one
error line. tests/test_cli.py runs every case; the "Bad input" table of docs/cli.md is generated from this list:

    python tests/cli_cases.py      # prints the Markdown table (docs/cli.md holds exactly this; a test checks it)
"""

from __future__ import annotations

#: files the cases refer to (written into the working directory before a case runs)
FIXTURES = {
    "bad.jsonl": '{"text": "a", "label": "x"}\n\n{"text": bad}\n',
    "bad.toml": "fraction = 0.5\n[steering]\nstrength = 1\n",
    "words.toml": "max_words = 0\n",
    "good.toml": "fraction = 0.5\n",
}
LATIN1 = ("latin1.csv", "text,label\ncaf\u00e9,x\n".encode("latin-1"))

#: (arguments, exit code, required part of the error line)
CASES: list[tuple[list[str], int, str]] = [
    ([], 2, "missing command; choose one of analyze, bundle, demo, erase"),
    (["record"], 2, "Missing option '--out'"),
    (["record", "--out", "x", "--layer", "1.5"], 2, "Invalid value for '--layer'"),
    (["recrd"], 2, "No such command 'recrd'. Did you mean 'record'?"),
    (["record", "--out", "x", "--bogus"], 2, "No such option: --bogus"),
    (["record", "--out", "x.safetensors", "--layer", "9"], 1, "layer 9 out of range"),
    (["record", "--out", "x.safetensors", "--dataset", "nope"], 1, "unknown dataset 'nope'"),
    (["ranges", "missing.safetensors", "--out", "r"], 1, "statistics file not found"),
    (["erase", "--ranges", "nowhere"], 1, "no range masks"),
    (["erase", "--ranges", "nowhere", "--operator", "clamp"], 1, "unknown operator 'clamp'"),
    (["run", "missing.toml"], 1, "config file not found"),
    (["run", "bad.toml"], 1, "unknown keys ['strength'] in [steering]; valid keys: runs, alpha, source, tau"),
    (["run", "words.toml"], 1, "max_words must be >= 1, got 0"),
    (["steer", "--source", "mean"], 2, "No such option: --source"),
    (["probe", "--limit", "5"], 2, "No such option: --limit"),
    (["probe", "--mceval", "agnws"], 1, "unknown MCEval8K task 'agnws'; choose one of agnews, amazon-reviews"),
    (["probe", "--mceval", "agnews", "--mceval-path", "nowhere"], 1, "MCEval8K task copy not found: nowhere"),
    (["neg", "--neurons", "0"], 1, "neg neurons must be >= 1, got 0"),
    (["record", "--out", "x.safetensors", "--seed", "-1"], 1, "seed must be >= 0, got -1"),
    (["nexttoken", "he,,she", "--source", "synthetic"], 1, "an empty concept between commas"),
    (["sweep", "bad.toml", "--param", "tau", "--values", "1,x"], 1, "--values must be comma-separated numbers"),
    (["sweep", "good.toml", "--param", "tau", "--values", ""], 1, "--values must be comma-separated numbers, got ''"),
    (["sweep", "good.toml", "--param", "layer", "--values", "1.5"], 1,
     "the layer sweep's values must be whole layer numbers, got 1.5"),
    (["record", "--out", "x.safetensors", "--model", "no-such-model"], 1, "neither a local directory"),
    (["record", "--out", "x.safetensors", "--model", "org/no-such-model"], 1,
     "could not load the model 'org/no-such-model'"),
    (["record", "--out", "x.safetensors", "--dataset", "bad.jsonl"], 1, "bad.jsonl, line 3: not JSON"),
    (["record", "--out", "x.safetensors", "--dataset", "latin1.csv"], 1, "latin1.csv is not UTF-8 text"),
    (["record", "--out", "x.safetensors", "--dataset", "next:pronoun"], 1, "unknown next-token family 'pronoun'"),
    (["nexttoken", "pronouns", "--source", "books.txt"], 1, "next-token source file not found: books.txt"),
    (["record", "--out", "x.safetensors", "--label-words", "sports,sports,business,politics"], 1,
     "label words share their first token: 'sports' and 'sports' (token 'sports') (give distinct ones: "
     "--label-words"),
]


def markdown() -> str:
    rows = ["| input | exit | the error line says |", "|---|---|---|"]
    for args, code, message in CASES:
        shown = " ".join(["nslens", *args]).replace("|", "\\|")
        rows.append(f"| `{shown}` | {code} | {message.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
