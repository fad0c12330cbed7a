"""Moving weights between tinygpt and other runtimes (Hugging Face transformers today)."""
