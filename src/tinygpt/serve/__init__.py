"""`tinygpt serve`: the OpenAI-compatible server, its decode worker and the chat page."""
