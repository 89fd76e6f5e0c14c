"""OpenAI-compatible gateway for agent frameworks: the only public surface; engines stay on loopback."""
