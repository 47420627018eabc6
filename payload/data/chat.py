"""Chat strategies: chat_template and legacy ShareGPT rows (being built)."""
