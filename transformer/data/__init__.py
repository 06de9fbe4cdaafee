"""Text and tokens: sources (the embedded corpus, local files, the hub), tokenizers, the special ids tasks frame
sequences with, per-run prepared token streams, and resumable seeded orders over them. Knows no model and no task."""
