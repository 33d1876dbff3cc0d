"""Model integrations (Hugging Face transformers: ``topv.enable/apply/remove``), imported lazily."""
