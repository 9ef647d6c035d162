"""Everything that runs the model: config, data, model loading, the DeepSpeed engine, training,
run state and resume, logs, the model passes that compute features, the round loop and the
``evotune`` command.

Layers: a module imports only from its own layer or an earlier one in this list, and no modules
import each other in a loop (``tests/test_layers.py`` checks this list against the imports):

1. foundations, importing nothing of evotune: ``files`` (atomic writes, fsync, file hashes,
   the cache folder), ``seeding`` (derived seeds, seeded samples, RNG states);
2. inputs and registries: ``sources`` (reading data files), ``data`` (rows, templates,
   labels), ``tokens`` (the tokenized pool), ``targets`` (influence's validation sets),
   ``scores`` (the score registry), ``model``, ``logs``, ``separation``, ``device_centres``;
3. settings and run state: ``config`` (its checks read the score registry and the sources),
   ``state`` (what a completed round leaves on disk; where a run resumes), ``selected``,
   ``engine`` (the one module that drives DeepSpeed), ``fit`` (training and evaluation);
4. ``passes`` (the model passes: embeddings, scores, gradients);
5. ``loop``, the round loop;
6. ``cli``, the command line: a module per subcommand (``launch/`` calls the same).

``evotune.selectors`` sits beside them: it imports nothing of ``evotune.trainer``.
"""
