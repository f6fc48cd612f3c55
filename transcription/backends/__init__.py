"""Speech backends. ``whisper`` runs OpenAI's Whisper in-process; nothing here imports Django."""
