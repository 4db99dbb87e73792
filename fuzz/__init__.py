"""Coverage-guided fuzzing of every decoder that reads bytes from outside (``make fuzz``, atheris).

``fuzz.targets`` defines the targets: each a one-input function (bytes in; returns on success or on the
target's documented refusal; anything else it raises is a finding), the refusal it allows, and seed
inputs. ``python -m fuzz`` runs them one after another under atheris for a bounded time each;
``tests/fuzz_regressions`` runs every target's seeds and every input a run ever found (no atheris there).
See docs/fuzzing.md.
"""
