"""A small typed todo app: what a user writes, checked by `mypy --strict` in the suite.

`models` (a list has todos: one-to-many; todos have tags: many-to-many), `todo` (the
queries, typed with `col()`), and `migrations/` (a revision adding a field, with the
`pyproject.toml` that `redmap migrate` reads). tests/test_typing.py runs it and
tests/test_docs.py type-checks it.
"""
