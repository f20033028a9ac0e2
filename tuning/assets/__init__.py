"""Assets: models, tokenizers, data sets, tasks, and the model owner's offline tools.

Who runs it: the model owner loads and converts its weights here (``models``, ``convert``,
``generate``); the data owner reads its data sets, tasks and the tokenizer (``datasets``,
``tasks``, ``encode``); ``cache`` is the shared on-disk asset cache (``$SECPTUNE_HOME``).
Nothing here secret-shares anything.
"""
