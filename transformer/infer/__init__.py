"""Using a trained model: loading a run (or a Hugging Face directory) for inference, sampling filters and KV-cache
generation, beam search and translation, encoder outputs (fill-mask, classification, embeddings), evaluation.
Needs no optimizer and no task."""
