"""ProX corpus refinement: a small LM writes a program per document; executing it refines the text.

* ``program``  the program language and its ``ast``-based parser (pure text);
* ``executor`` program execution and ProX's acceptance rule (pure text); ``prox_compat`` the
  released ProX code's reading of programs (``--semantics prox``);
* ``chunking`` the numbered-line chunks the chunk-level model sees (pure text);
* ``prompts``  chat prompts rendered with the model's own template (duck-typed tokenizer);
* ``backends`` generation with ``transformers`` in process or an OpenAI-compatible server
  (``journal`` keeps its answers across a kill);
* ``pipeline`` the sharded, resumable refining run behind ``tools/prox_refine.py``;
* ``teachers``, ``seeds``, ``annotate``: seed annotation by a teacher LLM behind
  ``tools/prox_annotate.py`` (teacher prompts in ``prompts/*.txt``);
* ``metrics``, ``evaluate``: program-quality evaluation behind ``tools/prox_eval.py``.
"""
