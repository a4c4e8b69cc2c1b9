"""Evaluation: what changed when a model was steered, with n and intervals.

Small modules, one job each:

- :mod:`refusal` substring refusal scorer (standard list + multilingual);
- :mod:`degeneracy` empty/looping/broken text detector;
- :mod:`outcome` refusal / bypass / degenerate per response;
- :mod:`judge` LLM judge (compliance, coherence) over any OpenAI-compatible API;
- :mod:`classifier` optional local HF classifier (Llama-Guard / HarmBench style);
- :mod:`kl`, :mod:`perplexity`, :mod:`capability` side-effect checks;
- :mod:`stats` Wilson / bootstrap intervals, McNemar, paired bootstrap, kappa;
- :mod:`backends` in-process or OpenAI-compatible generation;
- :mod:`run` ``run_eval``: resumable rows + summary.
"""
