"""lm-eval hooks of nslens's token-perplexity tasks (copied next to each generated task YAML).

Token perplexity, the NeuronLens paper's PPL (Section 5.3): exp of the mean negative log-likelihood over every
scored token of the corpus, ``exp(-sum(ll) / sum(n_tokens))`` (lm-eval's ``weighted_perplexity``). Each document
carries ``n_tokens``, the number of tokens lm-eval's rolling log-likelihood scores for it with the model's
tokenizer (written when the task is generated). Word and byte perplexity and bits per byte are lm-eval's own
definitions, reported alongside.
"""

import re


def process_results(doc, results):
    (loglikelihood,) = results
    text = doc["text"]
    n_words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    return {
        "token_perplexity": (loglikelihood, doc["n_tokens"]),
        "word_perplexity": (loglikelihood, n_words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
